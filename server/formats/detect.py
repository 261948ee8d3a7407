"""What a model path is: resolve a directory to its weights file, then name the format.

Order matters (see the sharded-SafeTensors case study in the design seeds): a
`*.safetensors.index.json` is recognised by its name *before* any byte is read, because its
first eight bytes (`{"metadat`) would otherwise be taken for a SafeTensors header length and
refused as absurd. Only then do magic bytes decide. Nothing here reads more than 16 bytes.
"""

from __future__ import annotations

import enum
from pathlib import Path

from modeldeploy.server.errors import FormatError

INDEX_SUFFIX = ".safetensors.index.json"
GGUF_MAGIC = b"GGUF"
APR_MAGICS = (b"APR\0", b"APR1", b"APR2", b"APRN")
#: The safetensors library's own cap on the JSON header; we refuse before allocating it.
SAFETENSORS_MAX_HEADER = 100_000_000


def shown(text: str, limit: int = 80) -> str:
    """A name taken from a file, safe for a one-line message: control characters escaped and
    long names cut, so a hostile key or tensor name cannot forge or flood the error line."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)[1:-1]


class ModelFormat(enum.StrEnum):
    """The model file formats we read."""

    SAFETENSORS = "safetensors"
    SAFETENSORS_SHARDED = "safetensors-sharded"
    GGUF = "gguf"


def _pick_gguf(directory: Path, ggufs: list[Path], quant: str | None) -> Path:
    if quant:
        matching = [p for p in ggufs if quant.lower() in p.name.lower()]
        if len(matching) == 1:
            return matching[0]
        names = ", ".join(p.name for p in ggufs) or "none"
        if not matching:
            raise FormatError(
                f"{directory}: no .gguf file matches quant {quant!r} (found: {names})"
            )
        raise FormatError(
            f"{directory}: quant {quant!r} matches several .gguf files "
            f"({', '.join(p.name for p in matching)}); be more specific"
        )
    if len(ggufs) == 1:
        return ggufs[0]
    raise FormatError(
        f"{directory}: several .gguf files ({', '.join(p.name for p in ggufs)}); "
        "pick one with --quant"
    )


def resolve_model_path(path: str | Path, quant: str | None = None) -> Path:
    """The one file that holds (or indexes) the weights of the model at `path`.

    A file is returned as is. A directory resolves to its `*.safetensors.index.json`, else its
    single `model.safetensors` (or only `.safetensors`), else its one `.gguf` — or the `.gguf`
    whose name contains `quant` (case-insensitive). Passing `quant` prefers GGUF files in a
    directory that holds both.
    """
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if not p.is_dir():
        return p
    entries = sorted(e for e in p.iterdir() if e.is_file())
    indexes = [e for e in entries if e.name.endswith(INDEX_SUFFIX)]
    singles = [e for e in entries if e.name.endswith(".safetensors")]
    ggufs = [e for e in entries if e.name.lower().endswith(".gguf")]
    if quant and ggufs:
        return _pick_gguf(p, ggufs, quant)
    if indexes:
        preferred = [e for e in indexes if e.name == "model" + INDEX_SUFFIX]
        if preferred or len(indexes) == 1:
            return (preferred or indexes)[0]
        raise FormatError(
            f"{p}: several SafeTensors indexes ({', '.join(e.name for e in indexes)})"
        )
    if singles:
        preferred = [e for e in singles if e.name == "model.safetensors"]
        if preferred or len(singles) == 1:
            return (preferred or singles)[0]
        raise FormatError(
            f"{p}: several .safetensors files ({', '.join(e.name for e in singles)}) "
            "and no model.safetensors.index.json"
        )
    if ggufs:
        return _pick_gguf(p, ggufs, quant)
    raise FormatError(
        f"{p}: no model weights (expected model.safetensors, *{INDEX_SUFFIX} or a .gguf file)"
    )


def detect_format(path: str | Path) -> ModelFormat:
    """Name the format of a model file, reading at most its first 16 bytes.

    Raises FormatError for APR files, empty files, directories and unknown content, naming
    the path and (for unknown content) the first bytes.
    """
    p = Path(path)
    if p.name.endswith(INDEX_SUFFIX):
        return ModelFormat.SAFETENSORS_SHARDED
    if p.is_dir():
        raise FormatError(f"{p}: is a directory, not a model file")
    try:
        with p.open("rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise FormatError(f"{p}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if not head:
        raise FormatError(f"{p}: file is empty")
    if head[:4] == GGUF_MAGIC:
        return ModelFormat.GGUF
    if head[:4] in APR_MAGICS:
        raise FormatError(f"{p}: APR models are not supported; convert to SafeTensors or GGUF")
    if head[8:9] == b"{" or p.name.endswith(".safetensors"):
        # the header itself (length cap, JSON, offsets) is validated by SafeTensorsModel
        return ModelFormat.SAFETENSORS
    raise FormatError(f"{p}: unknown model format (first bytes: {head[:8].hex(' ')})")
