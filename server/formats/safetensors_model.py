"""SafeTensors models, single-file or sharded, validated before a single weight is read.

A half-finished download or a hostile file must never load as garbage: the header length is
capped before the header is read (the safetensors library's own 100 MB limit), every tensor's
offsets are checked against its dtype, shape and the file size, and for a sharded model every
shard the index names must exist and hold every tensor mapped to it. Reading the weights is
left to the `safetensors` package (`safe_open`, memory-mapped); this module only describes and
checks. `config.json` comes from the sibling directory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats.detect import INDEX_SUFFIX, SAFETENSORS_MAX_HEADER, shown

#: bytes per element of each SafeTensors dtype (sub-byte float types are not served)
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: An index is JSON text listing names; anything bigger than this is not an index.
MAX_INDEX_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: SafeTensors dtype name (F32, BF16, ...), shape, byte size and its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate one .safetensors file's header; return its tensors and `__metadata__`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated SafeTensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER:
                raise FormatError(
                    f"{path}: SafeTensors header length {n} exceeds the "
                    f"{SAFETENSORS_MAX_HEADER}-byte limit"
                )
            if 8 + n > size:
                raise FormatError(
                    f"{path}: SafeTensors header of {n} bytes runs past the end of the "
                    f"{size}-byte file (truncated?)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a SafeTensors file") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:  # also Python's int-digit limit, which is no JSONDecodeError
        raise FormatError(f"{path}: SafeTensors header is not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{path}: SafeTensors header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: SafeTensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: SafeTensors __metadata__ is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_size)
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{path}: tensor '{shown(name)}' header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"{path}: tensor '{shown(name)}' has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{path}: tensor '{shown(name)}' has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{path}: tensor '{shown(name)}' has invalid data_offsets {offsets!r}")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * DTYPE_SIZES[dtype]
    begin, end = offsets
    if end - begin != nbytes:
        raise FormatError(
            f"{path}: tensor '{shown(name)}' spans {end - begin} bytes "
            f"but {dtype}{shape} needs {nbytes}"
        )
    if end > data_size:
        raise FormatError(
            f"{path}: tensor '{shown(name)}' data offsets {begin}..{end} run past the end of the "
            f"file's {data_size} data bytes (truncated?)"
        )
    return TensorInfo(name, dtype, tuple(shape), nbytes, path)


def _read_json(path: Path, what: str, limit: int = MAX_INDEX_BYTES) -> Any:
    try:
        size = path.stat().st_size
        if size > limit:
            raise FormatError(f"{path}: {what} of {size} bytes is larger than {limit}")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except ValueError as exc:  # also Python's int-digit limit, which is no JSONDecodeError
        raise FormatError(f"{path}: {what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} JSON is nested too deeply") from None


def load_sibling_json(model_dir: Path, name: str) -> dict[str, Any] | None:
    """A JSON-object sibling of the weights (config.json, generation_config.json, ...), or
    None when there is none; FormatError when it is not a JSON object."""
    path = model_dir / name
    if not path.is_file():
        return None
    data = _read_json(path, name, limit=10_000_000)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: {name} is not a JSON object")
    return data


def load_sibling_config(model_dir: Path) -> dict[str, Any] | None:
    """`config.json` next to the weights, or None when there is none."""
    return load_sibling_json(model_dir, "config.json")


class SafeTensorsModel:
    """A validated SafeTensors model: `.files`, `.tensors` (name -> TensorInfo), `.config`."""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        config: dict[str, Any] | None,
    ) -> None:
        self.path = path
        self.files = files
        self.tensors = tensors
        self.metadata = metadata
        self.config = config
        self.model_dir = path.parent
        self._handles: dict[tuple[Path, str], Any] = {}

    @property
    def sharded(self) -> bool:
        return self.path.name.endswith(INDEX_SUFFIX)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def open(cls, path: str | Path) -> SafeTensorsModel:
        """Open a `.safetensors` file or a `*.safetensors.index.json`, validating everything."""
        p = Path(path)
        if p.name.endswith(INDEX_SUFFIX):
            return cls._open_index(p)
        tensors, metadata = read_header(p)
        return cls(p, [p], tensors, metadata, load_sibling_config(p.parent))

    @classmethod
    def _open_index(cls, index_path: Path) -> SafeTensorsModel:
        index = _read_json(index_path, "SafeTensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: index has no 'weight_map' object")
        directory = index_path.parent
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise FormatError(
                    f"{index_path}: tensor '{shown(name)}' maps to "
                    f"'{shown(str(shard))}', not a file"
                )
            pure = PurePosixPath(shard)
            if pure.is_absolute() or ".." in pure.parts or "\\" in shard:
                raise FormatError(
                    f"{index_path}: shard '{shown(shard)}' (for tensor '{shown(name)}') "
                    "is outside the model directory"
                )
            shards.setdefault(shard, []).append(name)
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FormatError(
                f"{index_path}: shard {shown(missing[0])} named in the index is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + " (incomplete download?)"
            )
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        files: list[Path] = []
        for shard, names in shards.items():
            file = directory / shard
            files.append(file)
            in_shard, meta = read_header(file)
            metadata.update(meta)
            for name in names:
                info = in_shard.get(name)
                if info is None:
                    raise FormatError(
                        f"{index_path}: tensor '{shown(name)}' is mapped to shard {shown(shard)} "
                        "but that shard does not contain it"
                    )
                tensors[name] = info
        return cls(index_path, files, tensors, metadata, load_sibling_config(directory))

    def get_tensor(self, name: str, framework: str = "pt") -> Any:
        """Read one tensor through `safetensors.safe_open` (memory-mapped; one handle per file).

        `framework` is safetensors' ("pt" for torch, "np" for numpy).
        """
        from safetensors import safe_open

        info = self.tensors[name]
        key = (info.file, framework)
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = safe_open(str(info.file), framework=framework)
        return handle.get_tensor(name)

    def close(self) -> None:
        """Forget the open safe_open handles."""
        self._handles.clear()
