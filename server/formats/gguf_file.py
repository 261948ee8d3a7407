"""A fast, bounds-checked GGUF (v2/v3) reader with zero-copy tensor access.

Why our own parser: gguf-py's `GGUFReader` builds a numpy view per array element and takes
~10 s on a 152k-token vocabulary; the server must open a model (and `inspect` must answer) in
well under a second. Here the header is walked once over an `mmap` with `struct`: numeric
arrays become one `numpy.frombuffer` copy each, string arrays a tight loop, and tensor data is
never read until asked for, through a single `numpy.memmap` of the file.

Why bounds checks everywhere: a GGUF is untrusted input. Every length and count is checked
against the bytes that remain *before* anything is allocated or looped over, so a lying header
(an absurd tensor count, a string length past EOF, tensor data past EOF) is refused with a
one-line `FormatError` in microseconds instead of hanging or allocating gigabytes.

The `gguf` package supplies what it is good at: the quant-type enum, block sizes and the numpy
dequantizers.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats.detect import shown

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: ggml's GGML_MAX_DIMS
MAX_DIMS = 4
#: Nested arrays deeper than this are not written by any converter; refuse rather than recurse.
MAX_ARRAY_DEPTH = 2
#: Sanity caps independent of file size (llama.cpp has no model with 100k tensors or keys).
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000

# GGUF value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64, _F64 = range(13)
_SCALAR_FORMATS = {
    _U8: "<B",
    _I8: "<b",
    _U16: "<H",
    _I16: "<h",
    _U32: "<I",
    _I32: "<i",
    _F32: "<f",
    _BOOL: "<?",
    _U64: "<Q",
    _I64: "<q",
    _F64: "<d",
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_NUMPY_TYPES = {
    _U8: np.dtype("<u1"),
    _I8: np.dtype("<i1"),
    _U16: np.dtype("<u2"),
    _I16: np.dtype("<i2"),
    _U32: np.dtype("<u4"),
    _I32: np.dtype("<i4"),
    _F32: np.dtype("<f4"),
    _BOOL: np.dtype("?"),
    _U64: np.dtype("<u8"),
    _I64: np.dtype("<i8"),
    _F64: np.dtype("<f8"),
}
_U32S = struct.Struct("<I")
_U64S = struct.Struct("<Q")

#: Tensor types whose bytes are plain numbers numpy can view directly.
_PLAIN_DTYPES = {
    gguf.GGMLQuantizationType.F32: np.dtype("<f4"),
    gguf.GGMLQuantizationType.F16: np.dtype("<f2"),
    gguf.GGMLQuantizationType.F64: np.dtype("<f8"),
    gguf.GGMLQuantizationType.I8: np.dtype("<i1"),
    gguf.GGMLQuantizationType.I16: np.dtype("<i2"),
    gguf.GGMLQuantizationType.I32: np.dtype("<i4"),
    gguf.GGMLQuantizationType.I64: np.dtype("<i8"),
    # numpy has no bfloat16: the raw view is uint16 (torch: .view(torch.bfloat16))
    gguf.GGMLQuantizationType.BF16: np.dtype("<u2"),
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's description. `shape` is in numpy/torch order (GGUF's `ne` reversed);
    `offset` is the absolute byte offset of its data in the file."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int

    @property
    def type_name(self) -> str:
        """The quant type as llama.cpp spells it (F32, Q4_K, ...)."""
        return self.ggml_type.name


class _Cursor:
    """Reads little-endian GGUF values from a buffer, refusing to step past its end."""

    __slots__ = ("buf", "path", "pos", "size")

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file at byte {self.pos} (truncated?)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32S.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64S.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if self.pos + n > self.size:
            raise self.fail(f"{what}: string length {n} runs past the end of the file")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            self.need(st.size, what)
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            if vtype == _F32:
                # the shortest decimal that is the same float32: 1e-06, not 9.99999997e-07
                return float(str(np.float32(v)))
            return v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what}: unknown metadata value type {vtype}")

    def array(self, what: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        itype = self.u32(f"{what} item type")
        count = self.u64(f"{what} length")
        remaining = self.size - self.pos
        dt = _NUMPY_TYPES.get(itype)
        if dt is not None:
            if count * dt.itemsize > remaining:
                raise self.fail(f"{what}: array of {count} items runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += count * dt.itemsize
            return arr
        if itype == _STRING:
            if count * 8 > remaining:  # every string takes at least its 8-byte length
                raise self.fail(f"{what}: array of {count} strings runs past the end of the file")
            return self._strings(count, what)
        if itype == _ARRAY:
            if count * 12 > remaining:
                raise self.fail(f"{what}: array of {count} arrays runs past the end of the file")
            return [self.array(what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what}: unknown array item type {itype}")

    def _strings(self, count: int, what: str) -> list[str]:
        # The hot loop of the whole parser (two 152k-entry arrays in a Qwen GGUF): locals only.
        # (Copying the mmap into bytes windows first measured no faster; decode dominates.)
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64S.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                raise self.fail(f"{what}: string {i} runs past the end of the file (truncated?)")
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise self.fail(f"{what}: string {i} length {n} runs past the end of the file")
            try:
                out[i] = buf[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                out[i] = buf[pos:end].decode("utf-8", errors="replace")
            pos = end
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF file: version, metadata, tensor list, and zero-copy tensor data.

    `metadata` maps keys to Python values: ints, floats, bools and strings as such; numeric
    arrays as 1-D numpy arrays; string arrays (tokens, merges) as lists of str. The `GGUF.*`
    pseudo-keys of gguf-py are not included; see `version`, `alignment`, `data_offset`.
    """

    def __init__(
        self,
        path: Path,
        version: int,
        metadata: dict[str, Any],
        tensors: list[GGUFTensor],
        alignment: int,
        data_offset: int,
        file_size: int,
    ) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = file_size
        self._by_name = {t.name: t for t in tensors}
        self._data: np.memmap | None = None

    # ---------------------------------------------------------------- parsing

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Parse the header, metadata and tensor infos; refuse anything inconsistent."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise FormatError(f"{p}: too short to be a GGUF file ({size} bytes)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    return cls._parse(p, mm, size)
        except FileNotFoundError:
            raise FormatError(f"{p}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{p}: is a directory, not a GGUF file") from None

    @classmethod
    def _parse(cls, path: Path, mm: mmap.mmap, size: int) -> GGUFFile:
        cur = _Cursor(mm, size, path)
        if mm[:4] != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (magic {bytes(mm[:4])!r})")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise cur.fail("big-endian GGUF files are not supported")
            raise cur.fail(
                f"unsupported GGUF version {version} (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        rest = size - cur.pos
        # each tensor info takes >= 24 bytes (name length, dims, type, offset); each kv >= 13
        if n_tensors > MAX_TENSORS or n_tensors * 24 > rest:
            raise cur.fail(f"absurd tensor count {n_tensors} for a {size}-byte file")
        if n_kv > MAX_KV or n_kv * 13 > rest:
            raise cur.fail(f"absurd metadata count {n_kv} for a {size}-byte file")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            vtype = cur.u32(f"type of metadata '{shown(key)}'")
            if key in metadata:
                raise cur.fail(f"duplicate metadata key '{shown(key)}'")
            metadata[key] = cur.value(vtype, f"metadata '{shown(key)}'")

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

        infos: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int]] = []
        for i in range(n_tensors):
            name = cur.string(f"tensor {i} name")
            n_dims = cur.u32(f"tensor '{shown(name)}' dimension count")
            if not 0 < n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor '{shown(name)}' has {n_dims} dimensions (1 to {MAX_DIMS})")
            cur.need(8 * n_dims, f"tensor '{shown(name)}' dimensions")
            ne = struct.unpack_from(f"<{n_dims}Q", mm, cur.pos)
            cur.pos += 8 * n_dims
            raw_type = cur.u32(f"tensor '{shown(name)}' type")
            try:
                ttype = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise cur.fail(f"tensor '{shown(name)}' has unknown type {raw_type}") from None
            offset = cur.u64(f"tensor '{shown(name)}' offset")
            infos.append((name, ne, ttype, offset))

        data_offset = -(-cur.pos // alignment) * alignment
        tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, ne, ttype, rel in infos:
            if name in seen:
                raise cur.fail(f"duplicate tensor name '{shown(name)}'")
            seen.add(name)
            if ttype not in gguf.GGML_QUANT_SIZES:
                raise cur.fail(
                    f"tensor '{shown(name)}' has type {ttype.name} without a known block size"
                )
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            n_elements = 1
            for d in ne:
                n_elements *= d
            if ne[0] % block:
                raise cur.fail(
                    f"tensor '{shown(name)}': row of {ne[0]} is not a multiple of the "
                    f"{ttype.name} block size {block}"
                )
            n_bytes = n_elements // block * type_size
            if rel % alignment:
                raise cur.fail(
                    f"tensor '{shown(name)}': offset {rel} is not {alignment}-byte aligned"
                )
            start = data_offset + rel
            if start + n_bytes > size:
                raise cur.fail(
                    f"tensor '{shown(name)}' data ({n_bytes} bytes at {start}) runs past "
                    f"the end of the {size}-byte file (truncated?)"
                )
            tensors.append(GGUFTensor(name, ttype, tuple(reversed(ne)), n_elements, n_bytes, start))
        return cls(path, version, metadata, tensors, alignment, data_offset, size)

    # ---------------------------------------------------------------- access

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the data mapping (views handed out keep their own reference)."""
        self._data = None

    def release_pages(self) -> None:
        """Hand back the pages of the file mapping that this process has touched.

        Once a model is loaded, nothing reads through the mapping any more: rows that are
        still needed are read with pread (`quant.FileRows`). But the pages touched while
        loading stay mapped, and so they count in the process's RSS. Linux maps a whole
        page-cache folio (up to 2 MB) around every page it faults in, so the few small
        norms and biases spread over the file left 75 MB of the Qwen2.5-0.5B GGUF
        resident.

        The mapping is read-only and shared, so this loses nothing. A later read faults
        the page back in from the page cache. Views handed out earlier stay valid.
        """
        mapping = getattr(self._data, "_mmap", None)  # numpy's own mmap.mmap of the file
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if mapping is not None and advice is not None:
            mapping.madvise(advice)

    @property
    def architecture(self) -> str | None:
        """`general.architecture` as the file states it (llama.cpp's names)."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def chat_template(self) -> str | None:
        """The embedded default chat template, if any."""
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None

    def tensor(self, name: str) -> GGUFTensor:
        """The description of tensor `name` (KeyError naming it and the file if absent)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _bytes(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def raw(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the file, without copying.

        Plain types come typed and shaped (`shape`); BF16 as uint16 (reinterpret as bfloat16);
        quantized types as uint8 of shape `(*shape[:-1], bytes_per_row)`, the layout
        `gguf.quants.dequantize` takes.
        """
        t = self.tensor(name)
        seg = self._bytes()[t.offset : t.offset + t.n_bytes]
        dt = _PLAIN_DTYPES.get(t.ggml_type)
        if dt is not None:
            return seg.view(dt).reshape(t.shape)
        block, type_size = gguf.GGML_QUANT_SIZES[t.ggml_type]
        return seg.reshape(*t.shape[:-1], t.shape[-1] // block * type_size)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in numpy order (gguf-py's dequantizers)."""
        t = self.tensor(name)
        raw = self.raw(name)
        if t.ggml_type == gguf.GGMLQuantizationType.BF16:
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
        if t.ggml_type in _PLAIN_DTYPES:
            return np.array(raw, dtype=np.float32)
        try:
            out = gguf.quants.dequantize(raw, t.ggml_type)
        except NotImplementedError:
            raise FormatError(
                f"{self.path}: tensor '{shown(name)}' has quant type {t.ggml_type.name}, "
                "which cannot be dequantized"
            ) from None
        return np.asarray(out, dtype=np.float32).reshape(t.shape)
