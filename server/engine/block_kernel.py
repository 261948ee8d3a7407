"""Block-quantized layers multiplied in their compressed form (the C kernel in
block_kernel.c): GGUF Q5_0 in its own 5.5 bits, other types as 7-bit blocks.

Why: Q5_0 is what llama.cpp's Q4_K_M and Q5 files use for most projections of models
whose widths are not multiples of 256 (all of Qwen2.5-0.5B's q, k, o, gate and up).
torch has no 5-bit kernel, so these layers were requantized to int8: 8 bits a weight
where the file has 5.5, and decode, which streams every weight once a token, paid for
the extra bytes. And on an AVX2 CPU without native bf16 torch's int4/int8 kernels ran
far below memory speed (Qwen's 896 x 9728 gate|up at one row: 0.96 ms weight-only int8,
0.31 ms here; at eight rows 3.85 against 0.96 ms; bench/QUANT.md). The kernel keeps
Q5_0's bits exactly and rounds activations to int8 per block of 32, as llama.cpp does
for the same weights; Q4_0/Q4_1/Q4_K become 4-bit blocks with an fp16 scale and minimum
(torch's int4pack was 1.3x slower at one row even with native bf16, and 3-4x without),
and types neither grid holds (Q6_K, Q8_0) 7-bit blocks of 32 with their own scale.

Why built at run time: the kernel is plain C with AVX2 intrinsics (and an AVX-512 VNNI
build of the same source where the CPU has it: `variant`), compiled on first use
with the compiler torch.compile already needs (the server image ships gcc), into the
cache beside the conversion cache, keyed by the source and flags; later starts load it
in a millisecond. Where it cannot be built or run (no AVX2, no compiler, not x86),
`unavailable()` says why and those layers keep torch's int4/int8 kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from modeldeploy.server.contract import cache_root
from modeldeploy.server.engine.device import cpu_flags

log = logging.getLogger("modeldeploy.engine")

SOURCE = Path(__file__).with_name("block_kernel.c")
#: Input features per block (GGUF's Q5_0 block) and output rows per packed group.
BLOCK = 32
GROUP_ROWS = 8
#: Bytes of one packed record of 8 rows x 32 weights (block_kernel.c): 5-bit codes and 8
#: fp16 scales (Q5), 7-bit codes in bytes and 8 fp16 scales (Q7), 4-bit codes with 8 fp16
#: scales and 8 fp16 minimums (Q4). The record's size says which it is.
Q4_RECORD = 160
Q5_RECORD = 176
Q7_RECORD = 272
#: Each record's kind (the C functions' `kind`, and their names: q4_linear...), by size.
_KIND = {Q4_RECORD: 4, Q5_RECORD: 5, Q7_RECORD: 7}
#: Bytes of one GGUF Q5_0 block: fp16 scale, 32 high bits, 16 bytes of nibbles.
GGUF_BLOCK_BYTES = 22
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
#: The builds of the one source, by what the CPU must have: "vnni" sums four byte
#: products into int32 in one instruction (AVX-512 VNNI), "avx2" takes two.
VARIANTS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "avx2": (frozenset({"avx2", "fma", "f16c"}), FLAGS),
    "vnni": (
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512_vnni"}),
        (*FLAGS, "-mavx512f", "-mavx512vl", "-mavx512vnni"),
    ),
}
#: Set to "0" to keep torch's int4/int8 kernels for every layer.
ENV = "MODELDEPLOY_BLOCK_KERNEL"

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def unavailable() -> str | None:
    """Why the kernel cannot run here, or None once it is built and loaded."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the block kernel is x86 AVX2 code; this is {platform.machine()}"
    missing = VARIANTS["avx2"][0] - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    try:
        _library()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return f"the block kernel could not be built: {exc}"
    return None


def available() -> bool:
    return unavailable() is None


def _build(cc: str, flags: tuple[str, ...], out: Path) -> None:
    """Compile into a temporary file, then rename: a killed build leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def variant() -> str:
    """The build this CPU runs: the widest whose instructions it has."""
    return "vnni" if VARIANTS["vnni"][0] <= cpu_flags() else "avx2"


@functools.cache
def _library(build: str | None = None) -> ctypes.CDLL:
    build = build or variant()
    flags = VARIANTS[build][1]
    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"block_kernel-{build}-{key}.so"
    if not path.is_file():
        if cc is None:
            raise RuntimeError("no C compiler (gcc or cc) on PATH")
        _build(cc, flags, path)
        log.info("built the block kernel %s", path)
    # torch is imported first, so the kernel's OpenMP calls resolve to the runtime torch
    # loaded (same soname) and both share one thread team instead of competing for cores
    lib = ctypes.CDLL(str(path))
    lib.q5_pack.argtypes = [_P, _I64, _I64, _P]
    lib.q5_pack.restype = None
    for name in ("q4_linear", "q5_linear", "q7_linear"):
        getattr(lib, name).argtypes = [_P, _INT, _I64, _I64, _P, _I64, _P, _INT]
        getattr(lib, name).restype = None
    lib.blocks_expand.argtypes = [_INT, _P, _I64, _I64, _P, _INT, _INT]
    lib.blocks_expand.restype = None
    lib.q4_pack.argtypes = [_P, _P, _P, _I64, _I64, _P]
    lib.q4_pack.restype = None
    lib.q7_pack.argtypes = [_P, _I64, _I64, _P]
    lib.q7_pack.restype = None
    lib.q5_quantize.argtypes = [_P, _I64, _I64, _P]
    lib.q5_quantize.restype = None
    return lib


def supports(rows: int, cols: int) -> bool:
    """Whether a (rows, cols) weight fits the packed layouts."""
    return rows % GROUP_ROWS == 0 and cols % BLOCK == 0


def pack_q5(raw: np.ndarray, cols: int) -> torch.Tensor:
    """GGUF Q5_0 rows (rows, cols / 32 * 22 bytes) -> Q5 records (rows/8, cols/32, 176)."""
    rows = raw.shape[0]
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    if not supports(rows, cols) or src.shape[1] != cols // BLOCK * GGUF_BLOCK_BYTES:
        raise ValueError(f"Q5_0 weight ({rows}, {cols}) with rows of {src.shape[1]} bytes")
    out = torch.empty(rows // GROUP_ROWS, cols // BLOCK, Q5_RECORD, dtype=torch.uint8)
    _library().q5_pack(src.ctypes.data, rows, cols, out.data_ptr())
    return out


def pack_q7(w: np.ndarray) -> torch.Tensor:
    """float32 rows (rows, cols) -> Q7 records (rows/8, cols/32, 272): 7-bit codes per
    block of 32 with an fp16 scale (amax / 63)."""
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape
    if not supports(rows, cols):
        raise ValueError(f"weight ({rows}, {cols}) is not whole groups of 8 x 32")
    out = torch.empty(rows // GROUP_ROWS, cols // BLOCK, Q7_RECORD, dtype=torch.uint8)
    _library().q7_pack(src.ctypes.data, rows, cols, out.data_ptr())
    return out


def pack_q4(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> torch.Tensor:
    """4-bit codes uint8 (rows, cols) in 0..15 with w = code * scale - minimum, `scale`
    and `minimum` float32 (rows, cols / 32) -> Q4 records (rows/8, cols/32, 160); both
    are rounded to fp16."""
    src = np.ascontiguousarray(codes, dtype=np.uint8)
    rows, cols = src.shape
    if not supports(rows, cols) or not scale.shape == minimum.shape == (rows, cols // BLOCK):
        raise ValueError(f"4-bit weight ({rows}, {cols}) with scales {scale.shape}")
    d = np.ascontiguousarray(scale, dtype=np.float16)
    m = np.ascontiguousarray(minimum, dtype=np.float16)
    out = torch.empty(rows // GROUP_ROWS, cols // BLOCK, Q4_RECORD, dtype=torch.uint8)
    _library().q4_pack(src.ctypes.data, d.ctypes.data, m.ctypes.data, rows, cols, out.data_ptr())
    return out


def quantize(w: np.ndarray) -> np.ndarray:
    """float32 rows (rows, cols) -> GGUF Q5_0 bytes (rows, cols / 32 * 22), rounded as
    ggml rounds them (gguf-py's numpy quantizer gives the same bytes, 20x slower)."""
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape
    out = np.empty((rows, cols // BLOCK * GGUF_BLOCK_BYTES), dtype=np.uint8)
    _library().q5_quantize(src.ctypes.data, rows, cols, out.ctypes.data)
    return out


def out_features(packed: torch.Tensor) -> int:
    return packed.shape[0] * GROUP_ROWS


def in_features(packed: torch.Tensor) -> int:
    return packed.shape[1] * BLOCK


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 or bf16 @ W.T -> (M, N) float32, for Q4, Q5 or Q7 records."""
    if torch.compiler.is_compiling():
        return torch.ops.modeldeploy.block_linear(x, packed)  # define_op
    return _linear(x, packed)


def _linear(x: torch.Tensor, packed: torch.Tensor, build: str | None = None) -> torch.Tensor:
    """`build` names a variant to run (tests compare them); by default, this CPU's."""
    x = x.contiguous()
    m, k = x.shape
    n = out_features(packed)
    y = torch.empty(m, n, dtype=torch.float32)
    kernel = getattr(_library(build), f"q{_KIND[packed.shape[-1]]}_linear")
    kernel(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        m,
        k,
        packed.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


def _expand(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = out_features(packed), in_features(packed)
    out = torch.empty(n, k, dtype=dtype)
    kind, bf16 = _KIND[packed.shape[-1]], int(dtype == torch.bfloat16)
    threads = torch.get_num_threads()
    _library().blocks_expand(kind, packed.data_ptr(), n, k, out.data_ptr(), bf16, threads)
    return out


def to_bf16(packed: torch.Tensor) -> torch.Tensor:
    """The weight (N, K) as bf16, each code times its scale rounded once: for a bf16 GEMM
    over a prompt chunk (`blocks_expand` in block_kernel.c)."""
    return _expand(packed, torch.bfloat16)


def dequantize(packed: torch.Tensor) -> torch.Tensor:
    """The float32 weight (N, K) the kernel multiplies by (checks and fallbacks)."""
    return _expand(packed, torch.float32)


@functools.cache
def define_op() -> None:
    """`torch.ops.modeldeploy.block_linear`, which torch.compile keeps as one opaque call.

    Defined by the compiler's caller (`compiled.compile_decode`), as the FBGEMM op is:
    declaring a custom op costs start-up time an eager server need not pay.
    """

    @torch.library.custom_op("modeldeploy::block_linear", mutates_args=())
    def block_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return _linear(x, packed)

    @block_linear.register_fake
    def _(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features(packed)), dtype=torch.float32)
