"""Weight-only quantized linear layers for CPU, built straight from GGUF blocks.

Decode on a CPU is memory-bound: every generated token reads every weight once, so the
bytes per weight set the speed. torch ships CPU kernels that read compressed weights:
`_weight_int4pack_mm_for_cpu` (4-bit codes, one bf16 scale and zero per group of `G`
input features per output row) and `_weight_int8pack_mm` (int8, one scale per output
row). Both want bfloat16 activations; with float32 they are 20-100x slower, so we cast.

GGUF maps onto them as follows (w = dequantized weight, q = stored code):

| GGUF | w | int4pack: w = (q - 8) * scale + zero |
|---|---|---|
| Q4_0 | (q - 8) * d | scale = d, zero = 0 (exact) |
| Q4_1 | q * d + m | scale = d, zero = 8d + m (exact) |
| Q4_K | q * d*sc - dmin*m | scale = d*sc, zero = 8*scale - dmin*m (exact) |

"Exact" up to rounding the per-group scale/zero to bfloat16 (relative 2^-9), far below
the 4-bit step. Where our C kernel runs (`block_kernel.py`: activations rounded to int8
per block of 32), Q5_0 keeps its own blocks exactly and the other types below become
7-bit blocks of 32 instead. Otherwise every other quantized type (Q5_0, Q5_1, Q5_K,
Q6_K, Q8_0, Q2_K, Q3_K)
carries more bits than int4 and per-block scales that int8's per-row scale cannot hold,
so it is *requantized* by `QuantPolicy.requant`: int8 per row (default: small extra
error, 1 byte/weight), int4 per group of 32 (faster, lossy) or dense (exact, 2
bytes/weight). Figures behind the default are in bench/QUANT.md.

Kernel constraints found by experiment on torch 2.13 (not documented): int4pack needs
N % 16 == 0 and K % G == 0, and packs rows in independent blocks of 64 (so we pack in
chunks); int8pack returns garbage or crashes unless K % 16 == 0. Layers that do not fit,
and every layer on a non-CPU device (those kernels are CPU-only), fall back to a dense
weight in the model dtype, dequantized once at load.

The packed data lives in plain attributes, not parameters or buffers, so a later
`model.to_empty()` / `model.to(dtype)` (what the engine's materialize does) leaves it
alone; biases stay ordinary parameters so the normal loader fills them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import mmap
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from modeldeploy.server.contract import ENV_PREFIX
from modeldeploy.server.engine import block_kernel
from modeldeploy.server.engine.device import cpu_has_fast_bf16
from modeldeploy.server.engine.memory import (
    loading_heap,
    release_free_heap,
    release_pages,
    to_anonymous,
)
from modeldeploy.server.errors import UserInputError
from torch import nn

log = logging.getLogger("modeldeploy.engine")

Q = GGMLQuantizationType

#: Environment: the policy name (`QuantPolicy.parse`) and "0" to disable the conversion cache.
POLICY_ENV = ENV_PREFIX + "QUANT_POLICY"
CACHE_ENV = ENV_PREFIX + "QUANT_CACHE"

#: GGUF types whose blocks are int4pack groups of 32 with no loss.
EXACT_INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})
#: Unquantized GGUF types.
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
#: The activation dtype both CPU kernels are fast with.
KERNEL_DTYPE = torch.bfloat16
#: GGUF's block length for Q4_0/Q4_1 and Q4_K's sub-blocks: our int4 group size.
GGUF_GROUP = 32
#: From this many input rows on (prompt chunks, big decode batches) a layer dequantizes
#: its weight to bf16 and runs a bf16 GEMM: the int kernels are tuned for small M and
#: lose 2-3x to oneDNN's GEMM at M = 256 (bench/QUANT.md). Unpacking int4 costs ~5x
#: more than widening int8, so int4 layers switch at twice this.
DEQUANT_MIN_ROWS = 64
#: Rows converted per chunk, a multiple of int4pack's 64-row packing block; bounds the
#: temporary float32/int32 copies to a few MB per chunk.
CHUNK_ROWS = 1024


class Scheme(StrEnum):
    """How one weight is held in memory."""

    INT4 = "int4"
    INT8 = "int8"
    #: GGUF Q5_0 blocks as they are, multiplied by `block_kernel`.
    Q5_0 = "q5_0"
    #: 7-bit codes per block of 32 with an fp16 scale, multiplied by `block_kernel`.
    Q7 = "q7"
    #: 4-bit codes per block of 32 with an fp16 scale and minimum (GGUF Q4_0/Q4_1/Q4_K),
    #: multiplied by `block_kernel`.
    Q4 = "q4"
    DENSE = "dense"


class QuantPolicyError(UserInputError):
    """A --quant-policy value we do not know."""


@dataclass(frozen=True)
class QuantPolicy:
    """Which scheme each GGUF weight gets on a CPU.

    `requant` applies to quantized types that int4 cannot hold exactly, `floats` to
    F32/F16/BF16 weights; `keep_int4=False`
    turns the exact int4 path off (dense everywhere, the float reference for quality
    checks). `rescored_head` holds the output head as int4 with exact rescoring of each
    row's best candidates (`RescoredHead`). `dynamic_int8` runs int8 layers through
    FBGEMM with 8-bit activations (`dynamic_int8_linear`) instead of the weight-only
    kernel. `blocks` hands layers to `block_kernel` where it runs: Q5_0 in its own blocks,
    other inexact types (and Q4_K where torch's int4 kernel is slow) as 7-bit blocks.
    """

    requant: Scheme = Scheme.INT8
    floats: Scheme = Scheme.DENSE
    keep_int4: bool = True
    rescored_head: bool = True
    dynamic_int8: bool = True
    blocks: bool = True
    #: Group size for weights requantized to int4 (exact int4 types keep GGUF's 32).
    requant_group: int = GGUF_GROUP

    NAMES = ("auto", "int8", "int4", "dense")

    @classmethod
    def parse(cls, text: str | None) -> QuantPolicy:
        """`auto` (default), `int8` (every inexact type and the head as int8 rows: the
        most exact kernel policy), `int4` (everything int4: fastest, least exact),
        `dense` (no kernels). Measured trade-offs: bench/QUANT.md."""
        name = (text or "auto").strip().lower()
        if name == "auto":
            return cls()
        if name == "int8":
            return cls(rescored_head=False, dynamic_int8=False, blocks=False)
        if name == "int4":
            return cls(requant=Scheme.INT4, blocks=False)
        if name == "dense":
            return cls(
                requant=Scheme.DENSE,
                keep_int4=False,
                rescored_head=False,
                dynamic_int8=False,
                blocks=False,
            )
        raise QuantPolicyError(f"quant policy '{text}': expected one of {', '.join(cls.NAMES)}")

    def scheme_for(self, ggml_type: GGMLQuantizationType) -> Scheme:
        if ggml_type in FLOAT_TYPES:
            return self.floats
        native = self.blocks and block_kernel.available()
        if ggml_type in EXACT_INT4_TYPES and self.keep_int4:
            return Scheme.Q4 if native else Scheme.INT4
        if native and ggml_type == Q.Q5_0:
            return Scheme.Q5_0
        if native and self.requant == Scheme.INT8:
            return Scheme.Q7
        return self.requant

    def rescores(self, ggml_type: GGMLQuantizationType, vocab: int) -> bool:
        """Whether an output head of this type and size becomes a `RescoredHead`.

        Only where it pays: a quantized type int4 cannot hold exactly (an exact int4 head
        is already as cheap as it gets) and a vocabulary large enough for the head to be a
        real share of a decode step (Qwen2.5-0.5B's 152k x 896 head is 28% of its weights).
        """
        return (
            self.rescored_head
            and ggml_type not in FLOAT_TYPES | EXACT_INT4_TYPES
            and vocab >= RESCORE_MIN_VOCAB
        )


#: The policy of a rescored head's coarse pass: int4 over the whole vocabulary, in groups
#: of 128: its top candidates are recomputed exactly, so the coarser grid only touches the
#: tail, and the head reads 12% fewer bytes than with groups of 32 (scales and zeros are
#: 4 bytes a group): measured 3.9 -> 3.6 ms for Qwen's 152k x 896 head.
COARSE_HEAD_POLICY = QuantPolicy(
    requant=Scheme.INT4, rescored_head=False, requant_group=128, blocks=False
)


def coarse_head_policy() -> QuantPolicy:
    """The coarse pass as Q5_0 blocks where `block_kernel` runs, else int4 g128.

    Why: on an AVX2 CPU without native bf16 (an EPYC 7xx3 here) torch's int4 kernel took
    12.3 ms for Qwen's 152k x 896 head at one row and 46.8 ms at eight; the Q5_0 blocks
    7.6 and 19.2 ms, though they read 30 % more bytes; the finer grid also ranks the
    candidates better. Where FBGEMM runs with VNNI, its int8 pass replaces the int4 one
    once the server is ready, not the Q5_0 one (`wants_fast_head`).
    """
    if block_kernel.available():
        return QuantPolicy(requant=Scheme.Q5_0, rescored_head=False)
    return COARSE_HEAD_POLICY


#: The policy of a rescored head's fast coarse pass: int8 rows, multiplied through FBGEMM
#: (`RescoredHead.speed_up`). On the AMD EPYC this was measured on it beats the int4 pass
#: at every batch size (152k x 896: 3.3 against 3.5 ms for one row, 6.6 against 12.7 ms
#: for 8, 10.2 against 25.3 for 16): the int4 kernel's cost grows with the rows, FBGEMM's
#: barely. Packing it takes 1.5 s of one core, so it happens after the server is ready.
FAST_HEAD_POLICY = QuantPolicy(requant=Scheme.INT8, rescored_head=False, blocks=False)


def wants_fast_head(coarse: QuantLinear) -> bool:
    """Whether a rescored head's coarse pass is worth swapping for FBGEMM's int8 one.

    Not when it runs on the block kernel: with AVX-512 VNNI (the only CPUs where FBGEMM
    is used at all, `dynamic_int8_available`) its Q5_0 pass over Qwen's 152k x 896 head
    took 2.84 ms at one row against FBGEMM's 5.13, 7.68 against 9.43 at eight; FBGEMM
    only won from 16 rows (8.77 against 11.18 ms), and its int8 rows are 45 % more
    bytes to hold (bench/QUANT.md, 2026-12-07).
    """
    return not any(isinstance(seg, _Blocks) for seg in coarse.segments)


#: Rows per FBGEMM segment of a sped-up head. Packing holds transient copies of what it
#: packs: Qwen's 152k-row head packed whole raised the server's peak RSS by ~400 MB.
FAST_HEAD_ROWS = 1 << 16

#: Layers whose int8 weights `auto` multiplies with 8-bit activations: the MLP's fused
#: gate|up projection, the largest matrix of a layer, reading the RMS-normalized residual
#: stream. Measured on Qwen2.5-0.5B (bench/QUANT.md): q|k|v too raised the KL cost 1.6x
#: and broke a greedy continuation, the down projection (which reads gate*up, full of
#: outliers) 1.4x, and neither was faster: their matrices are small enough that the
#: per-call cost of rounding the activations eats the gain.
DYNAMIC_INT8_MODULES = ("mlp.w13",)

#: Smallest vocabulary whose head `auto` rescores (see `QuantPolicy.rescores`).
RESCORE_MIN_VOCAB = 32768


@functools.cache
def cpu_kernels_available() -> bool:
    """True when this torch build has both CPU kernels and they compute what we expect."""
    try:
        codes = torch.full((16, 32), 9, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.tensor([2.0, 1.0], dtype=KERNEL_DTYPE).expand(1, 16, 2).contiguous()
        x = torch.ones(1, 32, dtype=KERNEL_DTYPE)
        y4 = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        w8 = torch.ones(16, 32, dtype=torch.int8)
        y8 = torch.ops.aten._weight_int8pack_mm(x, w8, torch.ones(16, dtype=KERNEL_DTYPE))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    # (9 - 8) * 2 + 1 = 3 per weight, 32 inputs -> 96; int8: 32.
    return bool((y4 == 96).all() and (y8 == 32).all())


# ---------------------------------------------------------------------------------------
# GGUF blocks -> int4 codes with per-group scale/zero (exact types)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes in GGUF order: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_codes(
    ggml_type: GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact int4 form of Q4_0/Q4_1/Q4_K rows: codes uint8 (rows, cols) in 0..15 and
    scale, zero float32 (rows, cols // 32) with w = (code - 8) * scale + zero."""
    size = GGML_QUANT_SIZES[ggml_type][1]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    if ggml_type == Q.Q4_0:
        d = _f16(blocks, 0)
        codes = _nibbles_32(blocks[:, 2:])
        scale, zero = d, np.zeros_like(d)
    elif ggml_type == Q.Q4_1:
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        codes = _nibbles_32(blocks[:, 4:])
        scale, zero = d, 8.0 * d + m
    elif ggml_type == Q.Q4_K:
        n = blocks.shape[0]
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = gguf_quants.Q4_K.get_scale_min(blocks[:, 4:16])
        # 4 chunks of 32 bytes; each holds 64 elements: low nibbles first, then high.
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(n, 8, 32)
        scale = d * sc.astype(np.float32)
        zero = 8.0 * scale - dmin * mn.astype(np.float32)
    else:
        raise ValueError(f"{ggml_type.name} has no exact int4 form")
    return codes.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1)


def dequantize_rows(ggml_type: GGMLQuantizationType, raw: np.ndarray, cols: int) -> np.ndarray:
    """float32 (rows, cols) of any GGUF type: the engine's torch decoders where they exist,
    gguf-py's reference dequantizers otherwise."""
    if ggml_type in FLOAT_TYPES:
        if ggml_type == Q.BF16:
            bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(-1, cols)
        return np.asarray(raw, dtype=np.float32).reshape(-1, cols)
    from modeldeploy.server.engine.dequant import dequantize as torch_dequantize

    data = np.array(raw, dtype=np.uint8, copy=True)  # writable: torch refuses read-only views
    fast = torch_dequantize(torch.from_numpy(data.reshape(data.shape[0], -1)), ggml_type.name)
    if fast is not None:  # the engine's torch decoders: ~40x faster than gguf-py's numpy
        return fast.numpy().reshape(-1, cols)
    out = gguf_quants.dequantize(data, ggml_type)
    return np.asarray(out, dtype=np.float32).reshape(-1, cols)


# ---------------------------------------------------------------------------------------
# float -> int8 per row / int4 per group (requantization)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 (N, K), float32 scale (N,)) with w ~= q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group: codes uint8 (N, K) in 0..15 and float32 scale,
    zero (N, K // group) with w ~= (code - 8) * scale + zero."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scale, lo + 8.0 * scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4pack (N, K // 2) uint8 from codes (N, K), packed 64-row block by block.

    The CPU packer wants int32 input (4x the final size); chunking keeps that temporary
    small for a 150k-row output head. Rows pack in independent 64-row blocks, so chunked
    packing equals packing the whole (tests check it).
    """
    parts = []
    for start in range(0, codes.shape[0], CHUNK_ROWS):
        chunk = codes[start : start + CHUNK_ROWS].to(torch.int32).contiguous()
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------------
# Segments: one kernel call each; a layer is a row-wise concatenation of segments


def _unpack_int4(packed: torch.Tensor, n: int, k: int, b: int) -> torch.Tensor:
    blocks = packed.view(n // b, k, b // 2).transpose(1, 2)  # (n/b, b/2, k) strided
    out = torch.empty(n // b, b, k, dtype=torch.uint8)
    torch.bitwise_and(blocks, 0x0F, out=out[:, : b // 2])
    torch.bitwise_right_shift(blocks, 4, out=out[:, b // 2 :])
    return out.view(n, k)


@functools.cache
def int4_block_rows() -> int | None:
    """Rows per block of torch's int4 packing on this CPU, or None if neither known layout
    matches. The packer's layout follows the CPU's vector width (64 rows with AVX-512, 32
    with AVX2: on an AVX2 EPYC, reading it as 64 turned every prompt of 128 tokens and
    more into noise), so it is probed once on random codes instead of assumed."""
    if not cpu_kernels_available():
        return None
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    for b in (64, 32):
        if torch.equal(_unpack_int4(packed, n, k, b), codes.to(torch.uint8)):
            return b
    return None


@functools.cache
def gemm_dtype() -> torch.dtype:
    """The dtype of the one GEMM a prompt chunk runs on a dequantized weight: bf16 where
    the CPU multiplies it natively, else float32 (on an AVX2 EPYC, 896 x 9728 at M = 512:
    521 ms in bf16 against 115 ms in float32)."""
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


class _Int4:
    scheme = Scheme.INT4

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> None:
        self.packed, self.scale_zero, self.group = packed, scale_zero, group
        self.out_features = scale_zero.shape[1]
        self.dtype = KERNEL_DTYPE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        block = int4_block_rows()
        if x.shape[0] >= 2 * DEQUANT_MIN_ROWS and block and self.out_features % block == 0:
            dtype = gemm_dtype()
            return F.linear(x.to(dtype), self.weight_as(dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group, self.scale_zero
        )

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes back from int4pack (N a multiple of the packer's block).

        Layout found by probing torch 2.13's CPU packer (`int4_block_rows`): each block of
        B rows (64 on AVX-512 CPUs, 32 on AVX2 ones) is a (K, B/2) byte array whose byte
        [k, j] holds row j in the low and row j + B/2 in the high nibble of column k.
        Tests check this against the kernel itself.
        """
        b = int4_block_rows()
        if not b:
            raise RuntimeError("torch's int4 packing layout is not one we can read")
        n, k = self.out_features, self.packed.shape[1] * 2
        return _unpack_int4(self.packed, n, k, b)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, for prompt chunks: there one GEMM beats the int4 kernel."""
        n, k = self.out_features, self.packed.shape[1] * 2
        scale = self.scale_zero[..., 0].T.unsqueeze(-1).to(dtype)  # (N, groups, 1)
        offset = self.scale_zero[..., 1].T.unsqueeze(-1).to(dtype) - 8 * scale
        q = self.codes().view(n, -1, self.group).to(dtype)  # w = q * scale + offset
        return q.mul_(scale).add_(offset).view(n, k)

    def dense(self) -> torch.Tensor:
        """The weight this segment multiplies by (float32), for checks and fallbacks."""
        k = self.scale_zero.shape[0] * self.group
        # float32 in and out: the kernel then reproduces the bf16 scales/zeros exactly.
        eye = torch.eye(k)
        sz = self.scale_zero.float()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, sz).T

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale_zero)


class _Int8:
    """int8 weights with one scale per output row.

    Two ways to multiply: torch's `_weight_int8pack_mm` (weight-only: bf16 activations,
    exact up to the weight's rounding) and, once `enable_dynamic` ran, FBGEMM's dynamic
    int8 GEMM, which also rounds each input row to 8 bits and multiplies with VNNI
    integer dot products: 2x faster for one row and 3x for a decode batch of 8
    (bench/QUANT.md), at a small measured quality cost. Once enabled it serves every row
    count, prompt chunks too: there FBGEMM's GEMM is on par with widening to bf16 and a
    bf16 GEMM (M = 256, 896 x 9728: ~9 ms against ~5 ms GEMM + the widening), so no
    plain int8 copy is kept for them and enabling costs no memory.
    """

    scheme = Scheme.INT8

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight: torch.Tensor | None = weight
        self.scales = scales
        self.out_features = weight.shape[0]
        self.in_features = weight.shape[1]
        self.dtype = KERNEL_DTYPE
        self.packed: Any = None
        self.row_sums: torch.Tensor | None = None
        #: The packed weight's key in `_PACKED`, as a 0-d tensor (see `define_fbgemm_op`).
        self.handle: torch.Tensor | None = None
        self._key: int | None = None

    def __del__(self) -> None:
        if self._key is not None:
            _PACKED.pop(self._key, None)

    def enable_dynamic(self, mapped: bool = False) -> None:
        """Prepack for FBGEMM and drop the plain weight (see `dynamic_int8_linear`).

        `mapped`: the weight lies in a read-only file mapping (the conversion cache); its
        pages, read once for packing, are handed back so that the weight is resident
        only once, packed.
        """
        if self.packed is None and self.weight is not None:
            packed = prepack_dynamic_int8(self.weight, self.scales)
            # W 1 through the packed weight itself: exact int32 sums, one GEMV
            ones = torch.ones(1, self.in_features + 2)
            ones[0, -1] = 0.0  # the pins' range [0, 1]
            self.row_sums = torch.ops.quantized.linear_dynamic(ones, packed, False)[0]
            self.packed = packed
            self._key = next(_NEXT_KEY)
            _PACKED[self._key] = packed
            self.handle = torch.tensor(self._key)
            if mapped:
                release_pages(self.weight)
            self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Read before `packed`: a server packs on a background thread while it serves, and
        # `enable_dynamic` stores `packed` before it drops `weight`, so one of the two is
        # always there to use.
        weight = self.weight
        if self.packed is not None:
            return dynamic_int8_linear(x, self.packed, self.row_sums, self.handle)
        if x.shape[0] >= DEQUANT_MIN_ROWS:
            dtype = gemm_dtype()
            w = weight.to(dtype).mul_(self.scales[:, None].to(dtype))
            return F.linear(x.to(dtype), w)
        return torch.ops.aten._weight_int8pack_mm(x, weight, self.scales)

    def int8_weight(self) -> torch.Tensor:
        """The (N, K) int8 codes, from the packed copy when that is all there is."""
        if self.weight is not None:
            return self.weight
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.int_repr()[:, : self.in_features]

    def dense(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        n, k = self.out_features, self.in_features
        return n * k + _nbytes(self.scales)


# ---------------------------------------------------------------------------------------
# FBGEMM's dynamic int8 linear, made per-row and batch-invariant

#: Two input columns appended to every row, with zero weights: they pin each row's range
#: to [0, 1] after normalization, so FBGEMM's uint8 grid is exactly q = round(255 x)
#: (see `dynamic_int8_linear`).
_RANGE_PINS = torch.tensor([[1.0, 0.0]])


@functools.cache
def dynamic_int8_available() -> bool:
    """True when torch has FBGEMM's dynamic linear and it computes what we expect."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        w = torch.ones(16, 32, dtype=torch.int8)
        packed = prepack_dynamic_int8(w, torch.full((16,), 0.5, dtype=KERNEL_DTYPE))
        x = torch.ones(2, 32, dtype=KERNEL_DTYPE)
        x[1, 0] = -1.0
        y = dynamic_int8_linear(x, packed, torch.full((16,), 16.0))
        # Full-range codes: without VNNI, FBGEMM sums pairs of u8 x s8 products in int16
        # (vpmaddubsw), which saturates at 2 x 255 x 127; on an AVX2 EPYC that made
        # gate|up 14-23 % wrong. Such a CPU keeps the weight-only kernel.
        big = torch.full((16, 64), 127, dtype=torch.int8)
        packed = prepack_dynamic_int8(big, torch.ones(16, dtype=KERNEL_DTYPE))
        u = torch.ones(1, 64, dtype=KERNEL_DTYPE)
        u[0, 0] = 0.0  # range [0, 1]: every other input at the top code
        sums = torch.full((16,), 127.0 * 64)
        y_big = dynamic_int8_linear(u, packed, sums)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    exact = bool((y[0] == 16).all() and (y[1] == 15).all())
    return exact and bool(torch.allclose(y_big, torch.full_like(y_big, 127.0 * 63), rtol=1e-2))


def prepack_dynamic_int8(weight: torch.Tensor, scales: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 rows (N, K) with per-row scales, two zero columns
    appended for the range pins."""
    n = weight.shape[0]
    w = torch.cat((weight, torch.zeros(n, 2, dtype=torch.int8)), dim=1)
    with warnings.catch_warnings():  # quantized tensors are deprecated API; still the way in
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            w, scales.double(), torch.zeros(n, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qw, None)


def dynamic_int8_linear(
    x: torch.Tensor, packed: Any, row_sums: torch.Tensor, handle: torch.Tensor | None = None
) -> torch.Tensor:
    """x (M, K) @ W.T through FBGEMM, each input row rounded to 8 bits on its own range.

    FBGEMM quantizes its whole input with one scale and zero point from the input's
    min/max, so one row's outlier would coarsen every other row, and a sequence's output
    would depend on which others share its batch. So each row is mapped onto [0, 1]
    (x = lo + r * u) and two pins (against zero weights) fix FBGEMM's range there: every
    row gets all 255 levels over its own min..max, and results are bit-identical whether
    a row runs alone or in a batch. The affine map is undone exactly afterwards:
    W x = r * (W u) + lo * (W 1), with `row_sums` = W 1 precomputed.
    """
    xf = x.float()
    lo, hi = torch.aminmax(xf, dim=-1, keepdim=True)
    r = (hi - lo).clamp_min_(1e-30)
    u = torch.cat(((xf - lo) / r, _RANGE_PINS.expand(xf.shape[0], 2)), dim=-1)
    if handle is not None and torch.compiler.is_compiling():
        y = torch.ops.modeldeploy.fbgemm_dynamic_linear(u, handle, row_sums)  # define_fbgemm_op
    else:
        y = torch.ops.quantized.linear_dynamic(u, packed, False)
    return torch.addcmul(y.mul_(r), lo, row_sums).to(KERNEL_DTYPE)


#: FBGEMM's packed weights by handle. torch.compile cannot trace the packed object (a
#: TorchScript class), so a compiled graph passes its handle instead (`define_fbgemm_op`).
_PACKED: dict[int, Any] = {}
_NEXT_KEY = itertools.count()


@functools.cache
def define_fbgemm_op() -> None:
    """Define `torch.ops.modeldeploy.fbgemm_dynamic_linear`: FBGEMM's dynamic linear as
    a custom op, which torch.compile keeps as one opaque call in its graph.

    Its inputs are all tensors: the packed weight travels as a 0-d handle tensor, so the
    24 layers of a model share one graph (an int would be a constant, one graph per
    layer), and `row_sums` (N,) gives the output width to the op's shape function.
    Defined by the compiler's caller (`compiled.compile_decode`), not at import:
    declaring a custom op costs start-up time that a server without torch.compile
    need not pay.
    """

    @torch.library.custom_op("modeldeploy::fbgemm_dynamic_linear", mutates_args=())
    def fbgemm_dynamic_linear(
        u: torch.Tensor, handle: torch.Tensor, row_sums: torch.Tensor
    ) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(u, _PACKED[int(handle)], False)

    @fbgemm_dynamic_linear.register_fake
    def _(u: torch.Tensor, handle: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
        return u.new_empty((u.shape[0], row_sums.shape[0]))


#: The schemes `block_kernel` multiplies, and the size of their records (which says
#: which scheme a packed tensor holds).
BLOCK_RECORDS = {
    Scheme.Q4: block_kernel.Q4_RECORD,
    Scheme.Q5_0: block_kernel.Q5_RECORD,
    Scheme.Q7: block_kernel.Q7_RECORD,
}


class _Blocks:
    """Rows as `block_kernel` records (Q5_0's own bits, 4-bit blocks with a minimum, or
    7-bit blocks); takes float32 or bf16 rows as they come (`dtype` None: no cast) and
    returns float32."""

    dtype = None

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed
        self.out_features = block_kernel.out_features(packed)
        self.scheme = next(sc for sc, size in BLOCK_RECORDS.items() if size == packed.shape[-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Prompt chunks through oneDNN's bf16 GEMM where the CPU has native bf16: on two
        # Zen 4 cores 896 x 9728 at M = 256 took 7.7 ms widened to bf16 (0.9 of them
        # widening) against 11-17.6 ms in the integer kernel (bench/QUANT.md).
        if x.shape[0] >= DEQUANT_MIN_ROWS and gemm_dtype() == torch.bfloat16:
            return F.linear(x.to(torch.bfloat16), block_kernel.to_bf16(self.packed))
        return block_kernel.linear(x, self.packed)

    def dense(self) -> torch.Tensor:
        return block_kernel.dequantize(self.packed)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed)


class _Dense:
    scheme = Scheme.DENSE

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dense(self) -> torch.Tensor:
        return self.weight.float()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)


Segment = _Int4 | _Int8 | _Blocks | _Dense


def segment_state(seg: Segment) -> dict[str, Any]:
    """A segment as plain tensors/ints (what the conversion cache stores)."""
    if isinstance(seg, _Blocks):
        return {"scheme": seg.scheme.value, "packed": seg.packed}
    if isinstance(seg, _Int4):
        return {
            "scheme": "int4",
            "packed": seg.packed,
            "scale_zero": seg.scale_zero,
            "group": seg.group,
        }
    if isinstance(seg, _Int8):
        return {"scheme": "int8", "weight": seg.int8_weight(), "scales": seg.scales}
    return {"scheme": "dense", "weight": seg.weight}


def segment_from_state(state: dict[str, Any]) -> Segment:
    if state["scheme"] in BLOCK_RECORDS:
        return _Blocks(state["packed"])
    if state["scheme"] == "int4":
        return _Int4(state["packed"], state["scale_zero"], int(state["group"]))
    if state["scheme"] == "int8":
        return _Int8(state["weight"], state["scales"])
    return _Dense(state["weight"])


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class GGUFPart:
    """Rows of one GGUF tensor that become rows of a (possibly fused) linear layer.

    `raw` is what `GGUFFile.raw(name)` returns: uint8 (rows, bytes_per_row) for quantized
    types, typed (rows, cols) for float types. `row_order` reorders rows (llama's q/k
    un-permutation) — exact on quantized data, since GGUF blocks never span rows.
    """

    ggml_type: GGMLQuantizationType
    raw: np.ndarray
    shape: tuple[int, int]
    row_order: np.ndarray | None = None
    name: str = ""

    def rows(self, start: int, stop: int) -> np.ndarray:
        idx = slice(start, stop) if self.row_order is None else self.row_order[start:stop]
        return np.asarray(self.raw[idx])


@dataclass
class _Plan:
    scheme: Scheme
    parts: list[GGUFPart] = field(default_factory=list)
    group: int = GGUF_GROUP  # int4 only

    @property
    def rows(self) -> int:
        return sum(p.shape[0] for p in self.parts)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held as int4pack / int8 / dense row segments.

    Fused layers (q|k|v, gate|up) may mix GGUF types; adjacent parts with the same scheme
    share one segment (one kernel call). Inputs of any leading shape and dtype: rows are
    flattened (prefill chunks and batched decode are just M > 1), cast to the kernel
    dtype, and the output comes back in the input dtype.
    """

    def __init__(self, segments: Sequence[Segment], in_features: int, bias: bool) -> None:
        super().__init__()
        self.segments = list(segments)
        self.in_features = in_features
        self.out_features = sum(s.out_features for s in self.segments)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls,
        ggml_type: GGMLQuantizationType,
        raw: np.ndarray,
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        device: torch.device | str = "cpu",
        bias: bool = False,
        policy: QuantPolicy | None = None,
    ) -> QuantLinear:
        """One GGUF weight (numpy order: shape = (out, in)) as a layer."""
        part = GGUFPart(GGMLQuantizationType(ggml_type), raw, (int(shape[0]), int(shape[1])))
        return cls.from_gguf_parts([part], dtype, device=device, bias=bias, policy=policy)

    @classmethod
    def from_gguf_parts(
        cls,
        parts: Sequence[GGUFPart],
        dtype: torch.dtype,
        *,
        device: torch.device | str = "cpu",
        bias: bool = False,
        policy: QuantPolicy | None = None,
    ) -> QuantLinear:
        """A layer whose rows are the parts' rows in order (fused projections)."""
        policy = policy or QuantPolicy()
        device = torch.device(device)
        cols = {p.shape[1] for p in parts}
        if len(cols) != 1:
            raise ValueError(f"fused parts disagree on input features: {sorted(cols)}")
        k = cols.pop()
        kernels = device.type == "cpu" and cpu_kernels_available() and k % GGUF_GROUP == 0
        plans: list[_Plan] = []
        for p in parts:
            scheme = policy.scheme_for(p.ggml_type) if kernels else Scheme.DENSE
            if plans and plans[-1].scheme == scheme:
                plans[-1].parts.append(p)
            else:
                plans.append(_Plan(scheme, [p]))
        segments = []
        for plan in plans:
            if plan.scheme == Scheme.INT4 and plan.rows % 16:
                plan.scheme = policy.requant if policy.requant != Scheme.INT4 else Scheme.DENSE
            if plan.scheme in BLOCK_RECORDS and not all(
                block_kernel.supports(p.shape[0], k) for p in plan.parts
            ):
                plan.scheme = Scheme.INT8
            requantized = not any(p.ggml_type in EXACT_INT4_TYPES for p in plan.parts)
            if plan.scheme == Scheme.INT4 and requantized and k % policy.requant_group == 0:
                plan.group = policy.requant_group
            segments.append(_build_segment(plan, k, dtype, device))
        layer = cls(segments, k, bias)
        return layer.to(device=device, dtype=dtype) if bias else layer

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        scheme: Scheme,
        *,
        group_size: int = GGUF_GROUP,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize a float weight (out, in) — e.g. a SafeTensors model served with int8."""
        n, k = weight.shape
        if weight.device.type != "cpu" or not cpu_kernels_available() or k % 32:
            scheme = Scheme.DENSE
        if scheme == Scheme.INT4 and (n % 16 or k % group_size):
            scheme = Scheme.INT8
        if scheme == Scheme.INT4:
            codes, scale, zero = int4_groups(weight, group_size)
            seg: Segment = _Int4(pack_int4(codes), _scale_zero(scale, zero), group_size)
        elif scheme == Scheme.INT8:
            q, s = int8_rows(weight)
            seg = _Int8(q, s.to(KERNEL_DTYPE))
        else:
            seg = _Dense(weight.detach().clone())
        layer = cls([seg], k, bias is not None)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    # -- use ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if len(self.segments) == 1:  # the common case, in as few calls as possible
            seg = self.segments[0]
            # dtype checks in Python: a no-op .to() still costs a dispatch, ~100 a step
            same = seg.dtype is None or x2.dtype == seg.dtype
            y = seg((x2 if same else x2.to(seg.dtype)).contiguous())
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*lead, self.out_features)
        cast: dict[torch.dtype | None, torch.Tensor] = {}
        outs = []
        for seg in self.segments:
            xs = cast.get(seg.dtype)
            if xs is None:
                want = x2.dtype if seg.dtype is None else seg.dtype
                xs = cast[seg.dtype] = x2.to(want).contiguous()
            outs.append(seg(xs).to(x.dtype))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with (tests, fallbacks)."""
        return torch.cat([s.dense() for s in self.segments])

    @property
    def schemes(self) -> list[str]:
        return [s.scheme.value for s in self.segments]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, schemes={self.schemes}"
        )


def _scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(N, groups) scale and zero -> the kernel's (groups, N, 2) tensor in bf16."""
    return torch.stack([scale.T, zero.T], dim=-1).to(KERNEL_DTYPE).contiguous()


def _build_segment(plan: _Plan, k: int, dtype: torch.dtype, device: torch.device) -> Segment:
    """Convert a run of parts chunk by chunk into one segment."""
    n = plan.rows
    if plan.scheme in BLOCK_RECORDS:
        g, record = block_kernel.GROUP_ROWS, BLOCK_RECORDS[plan.scheme]
        packed = torch.empty(n // g, k // block_kernel.BLOCK, record, dtype=torch.uint8)
        for row, part, start, stop in _chunks(plan.parts):
            raw = part.rows(start, stop)
            if plan.scheme == Scheme.Q4:  # scheme_for gives Q4 to exact 4-bit types only
                codes, scale, zero = int4_codes(part.ggml_type, raw, stop - start, k)
                chunk = block_kernel.pack_q4(codes, scale, 8.0 * scale - zero)
            elif plan.scheme == Scheme.Q7:
                chunk = block_kernel.pack_q7(dequantize_rows(part.ggml_type, raw, k))
            elif part.ggml_type == Q.Q5_0:
                chunk = block_kernel.pack_q5(raw, k)
            else:  # requantized (a rescored head's coarse pass)
                w = dequantize_rows(part.ggml_type, raw, k)
                chunk = block_kernel.pack_q5(block_kernel.quantize(w), k)
            packed[row // g : (row + stop - start) // g] = chunk
        return _Blocks(packed)
    if plan.scheme == Scheme.INT4:
        group = plan.group
        codes = torch.empty(n, k, dtype=torch.uint8)
        scale = torch.empty(n, k // group)
        zero = torch.empty(n, k // group)
        for row, part, start, stop in _chunks(plan.parts):
            raw = part.rows(start, stop)
            rows = stop - start
            if part.ggml_type in EXACT_INT4_TYPES:
                c, s, z = (torch.from_numpy(a) for a in int4_codes(part.ggml_type, raw, rows, k))
            else:
                w = torch.from_numpy(dequantize_rows(part.ggml_type, raw, k))
                c, s, z = int4_groups(w, group)
            codes[row : row + rows], scale[row : row + rows], zero[row : row + rows] = c, s, z
        return _Int4(pack_int4(codes), _scale_zero(scale, zero), group)
    if plan.scheme == Scheme.INT8:
        q8 = torch.empty(n, k, dtype=torch.int8)
        s8 = torch.empty(n)
        for row, part, start, stop in _chunks(plan.parts):
            w = torch.from_numpy(dequantize_rows(part.ggml_type, part.rows(start, stop), k))
            q8[row : row + stop - start], s8[row : row + stop - start] = int8_rows(w)
        return _Int8(q8, s8.to(KERNEL_DTYPE))
    weight = torch.empty(n, k, dtype=dtype, device=device)
    for row, part, start, stop in _chunks(plan.parts):
        w = torch.from_numpy(dequantize_rows(part.ggml_type, part.rows(start, stop), k))
        weight[row : row + stop - start] = w.to(device=device, dtype=dtype)
    return _Dense(weight)


def _chunks(parts: Sequence[GGUFPart]):
    """(output row, part, part row start, part row stop) in CHUNK_ROWS pieces."""
    row = 0
    for part in parts:
        for start in range(0, part.shape[0], CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, part.shape[0])
            yield row, part, start, stop
            row += stop - start


class FileRows:
    """Rows of a table in a file, read with pread instead of through its mapping.

    Reading a row through a mapping makes its pages part of the process's RSS, and
    kernels with large page-cache folios map 2 MB around every touched page (measured on
    Linux 6.18, madvise(RANDOM) or not). A rescored head reads 64 scattered rows a step,
    so its whole table (Qwen2.5-0.5B: 145 MB) soon counted against the pod's memory.
    pread copies just the rows; the file stays in the page cache, which the kernel may
    reclaim. 64 rows cost ~100 us.
    """

    def __init__(self, path: str, offset: int, row_bytes: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.offset, self.row_bytes = offset, row_bytes

    @classmethod
    def of(cls, raw: np.ndarray) -> FileRows | None:
        """For a C-contiguous (rows, bytes) view into an `np.memmap`, else None."""
        if raw.ndim != 2 or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
            return None
        root: Any = raw
        while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
            root = root.base
        if not isinstance(root, np.memmap) or not root.filename:
            return None
        offset = raw.ctypes.data - root.ctypes.data + root.offset
        return cls(root.filename, offset, raw.shape[1])

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        for i, r in enumerate(rows.tolist()):
            if os.preadv(self.fd, [out[i]], self.offset + r * self.row_bytes) != self.row_bytes:
                raise OSError(f"short read of row {r} from the model file")
        return out

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class QuantEmbedding(nn.Module):
    """Token embedding read from the GGUF bytes, dequantizing only the rows looked up.

    The table is the largest tensor of a small model (Qwen2.5-0.5B: 151936 x 896, 272 MB
    in bf16); it stays in the file (and the page cache) and a lookup reads and
    dequantizes just its rows (`FileRows`, when the bytes come from a file mapping).
    """

    def __init__(
        self,
        ggml_type: GGMLQuantizationType,
        raw: np.ndarray,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.ggml_type = GGMLQuantizationType(ggml_type)
        self.raw = raw
        self.num_embeddings, self.embedding_dim = int(shape[0]), int(shape[1])
        self.dtype = dtype
        self.device = torch.device(device)
        self.file_rows = FileRows.of(raw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1).cpu().numpy()
        uniq, inverse = np.unique(flat, return_inverse=True)
        raw = self.file_rows.read(uniq) if self.file_rows else self.raw[uniq]
        rows = dequantize_rows(self.ggml_type, raw, self.embedding_dim)
        out = torch.from_numpy(rows)[torch.from_numpy(inverse.reshape(-1))]
        out = out.to(device=self.device, dtype=self.dtype)
        return out.reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.ggml_type.name}"


#: Block length of `top_candidates`' first pass.
TOPK_BLOCK = 64


def top_candidates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (B, k) of each row's k largest logits, like `topk(k).indices`.

    A full topk over a 152k vocabulary costs ~0.3 ms a row on CPU; this looks at the
    maxima of blocks of 64 first. Each of the k largest values lies in one of the k
    blocks with the largest maxima (a block ranked lower has k blocks, each holding a
    larger value, above it), so a second topk over those blocks' entries finds them
    all: 57 us a row. Ties at the k-th value may pick different, equal entries.
    """
    b, v = logits.shape
    n = v // TOPK_BLOCK * TOPK_BLOCK
    if n // TOPK_BLOCK <= k:
        return logits.topk(min(k, v), dim=-1).indices
    blocks = logits[:, :n].view(b, -1, TOPK_BLOCK).amax(-1).topk(k, dim=-1).indices
    cand = blocks[..., None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=logits.device)
    cand = cand.view(b, -1)
    if n < v:  # the last, partial block: always a candidate
        tail = torch.arange(n, v, device=logits.device).expand(b, -1)
        cand = torch.cat((cand, tail), dim=1)
    return cand.gather(1, logits.gather(1, cand).topk(k, dim=-1).indices)


class RescoredHead(nn.Module):
    """The output head as int4 over the whole vocabulary, with each row's best candidates
    recomputed from the GGUF's own rows.

    The head is the largest matrix a small model reads per token (Qwen2.5-0.5B: 136 M
    weights, a third of a decode step's bytes as int8). Which token is chosen is decided
    among the top few logits, so those are computed from the file's exact weights (in
    float32), while the tail, which only matters through its tiny probabilities, comes
    from int4 at half the bytes of int8. Greedy choices, logprobs' top entries and top-k
    sampling thus see exact logits; bench/QUANT.md measures the rest.

    With `fast` (int8 rows of the same head) the server later swaps the int4 pass for
    FBGEMM's (`speed_up`): int4 is what loads within the start-up budget, int8 through
    FBGEMM what runs faster once packed, most of all for decode batches.
    """

    #: Candidates per row: far more than the int4 error can reorder (its top-1 is in the
    #: exact top-8 at every measured position) and at least MAX_TOP_LOGPROBS.
    CANDIDATES = 64

    def __init__(
        self,
        coarse: QuantLinear,
        exact: QuantEmbedding,
        fast: _Int8 | None = None,
        mapped: bool = False,
    ) -> None:
        super().__init__()
        self.coarse = coarse
        self.exact = exact
        #: int8 rows for FBGEMM, waiting for `speed_up` (packing is too slow for start-up).
        self.fast = fast
        #: Both passes lie in the conversion cache's file mapping (a cache hit).
        self.mapped = mapped
        self.in_features, self.out_features = coarse.in_features, coarse.out_features

    def speed_up(self) -> None:
        """Swap the int4 coarse pass for FBGEMM's int8 one (`FAST_HEAD_POLICY`).

        Called once, on a background thread after the server is ready. The swap is one
        attribute store, so a step running meanwhile finishes with the layer it read.
        Only the tail can change: each row's best candidates get the file's exact logits
        either way, so greedy choices and top logprobs are the same before and after.
        The replaced pass's file pages are handed back (a step still reading it faults
        them in again from the page cache).
        """
        fast = self.fast
        if fast is None or not dynamic_int8_available():
            return
        weight, scales = fast.int8_weight(), fast.scales
        segments = []
        for start in range(0, fast.out_features, FAST_HEAD_ROWS):
            seg = _Int8(
                weight[start : start + FAST_HEAD_ROWS], scales[start : start + FAST_HEAD_ROWS]
            )
            seg.enable_dynamic(self.mapped)
            segments.append(seg)
        replaced, self.coarse = self.coarse, QuantLinear(segments, self.in_features, bias=False)
        self.fast = None
        if self.mapped:
            for seg in replaced.segments:
                for t in segment_state(seg).values():
                    if isinstance(t, torch.Tensor):
                        release_pages(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        logits = self.coarse(x2).float()
        ids = top_candidates(logits, self.CANDIDATES).unique()
        rows = self.exact(ids)  # (U, in) float32, dequantized from the file
        logits[:, ids] = x2.float() @ rows.T
        return logits.view(*lead, self.out_features)

    @property
    def schemes(self) -> list[str]:
        return [f"{s}+rescored" for s in self.coarse.schemes]

    @property
    def nbytes(self) -> int:
        return self.coarse.nbytes


# ---------------------------------------------------------------------------------------
# Whole-model integration for the engine's Transformer + GGUF loader


@dataclass
class QuantReport:
    """What `quantize_gguf_model` did: GGUF tensors it consumed and the bytes it holds."""

    consumed: set[str] = field(default_factory=set)
    layers: dict[str, list[str]] = field(default_factory=dict)  # module -> schemes
    nbytes: int = 0
    cache: str | None = None
    cache_hit: bool = False
    #: Segments still read from the conversion cache's file mapping (`move_to_memory`).
    mapped: list[Any] = field(default_factory=list, repr=False)
    #: Rescored heads whose fast coarse pass is still to be packed (`settle`).
    heads: list[Any] = field(default_factory=list, repr=False)
    #: int8 segments still to be packed for FBGEMM (`quantize_gguf_model(pack=False)`).
    packs: list[Any] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for schemes in self.layers.values():
            for s in schemes:
                counts[s] = counts.get(s, 0) + 1
        return {
            "layers": len(self.layers),
            "segments": counts,
            "bytes": self.nbytes,
            "cache_hit": self.cache_hit,
        }


#: Bump when the stored layout changes; part of the cache key.
CACHE_FORMAT = 6


def conversion_cache_file(
    cache_dir: Path, gguf_path: Path, policy: QuantPolicy, dtype: torch.dtype
) -> Path:
    """Where the converted layers of this file/policy/torch build are cached.

    Keyed by the file's identity (resolved path, size, mtime) rather than a hash of its
    bytes: hashing 500 MB would cost the time the cache saves.
    """
    st = gguf_path.stat()
    key = json.dumps(
        [
            str(gguf_path.resolve()),
            st.st_size,
            st.st_mtime_ns,
            policy.requant.value,
            policy.floats.value,
            policy.keep_int4,
            policy.rescored_head,
            policy.requant_group,
            policy.blocks and block_kernel.available(),
            str(dtype),
            torch.__version__,
            CACHE_FORMAT,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{gguf_path.stem}-{digest}.pt"


def _load_cache(path: Path, modules: set[str]) -> dict[str, Any] | None:
    """The cached layers, memory-mapped (no read at load), or None if absent/unusable."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, mmap=True, weights_only=True)
    except Exception as exc:  # a truncated or foreign file is a cache miss, not an error
        log.warning("ignoring quantization cache %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or set(data) != modules:
        return None
    return data


def _save_cache(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename); a read-only cache dir only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write quantization cache %s: %s", path, exc)


def move_to_memory(segments: list[Segment]) -> None:
    """Move segments read from the conversion cache's file mapping into memory that may
    get huge pages (`memory`: a decode step streams every weight; measured 6% faster).

    Runs on a background thread once the server is ready: the copies and their page
    faults cost ~0.5 s, too much for the start-up budget. Safe while the scheduler runs:
    a kernel call holds the tensor it read, old or new (both hold the same values), and
    the file's pages, handed back after the swap, fault in again from the page cache if a
    call still reads them.
    """
    for seg in segments:
        if isinstance(seg, _Int4 | _Blocks):
            seg.packed = to_anonymous(seg.packed)
        elif isinstance(seg, _Dense) or (isinstance(seg, _Int8) and seg.weight is not None):
            seg.weight = to_anonymous(seg.weight)


def settle(
    segments: list[Segment],
    heads: list[RescoredHead],
    packs: Sequence[_Int8] = (),
    mapped: bool = False,
) -> None:
    """What a server does once it is ready, on a background thread: the FBGEMM packing
    it skipped to be ready sooner (`packs`, read from the file mapping when `mapped`),
    weights out of the file mapping (`move_to_memory`), then each rescored head onto its
    fast pass."""
    if packs:
        with loading_heap():  # packing's temporaries in mappings of their own, as at load
            _enable_dynamic_all(list(packs), mapped)
        release_free_heap()
    move_to_memory(segments)
    for head in heads:
        head.speed_up()


def _enable_dynamic_all(segments: list[_Int8], mapped: bool) -> None:
    """Prepack for FBGEMM on every torch thread at once: FBGEMM's packer is serial and
    releases the GIL, and packing is most of a cached load (Qwen2.5-0.5B: 0.9 s serial,
    0.55 s on two threads). After the cache is written, which stores plain int8."""
    if not segments:
        return
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(lambda seg: seg.enable_dynamic(mapped), segments))


def quantize_gguf_model(
    model: nn.Module,
    gguf: Any,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    policy: QuantPolicy | None = None,
    permuted: bool = False,
    quantize_embedding: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    cache_dir: Path | None = None,
    pack: bool = True,
) -> QuantReport:
    """Swap the model's 2-D projection layers for QuantLinear built from GGUF bytes.

    Call on the Transformer *before* `materialize()` (modules still on meta): the swapped
    layers never exist densely, so peak memory stays near the quantized size. Afterwards
    load the remaining tensors as usual, skipping `report.consumed`. Biases of swapped
    layers remain parameters named as before (`...wqkv.bias`) for the loader to fill.
    `permuted=True` undoes llama.cpp's q/k row permutation (llama/mistral files).
    With `cache_dir` (CPU only) the converted layers are saved there on the first load
    and memory-mapped on the next ones, so a restart skips the conversion entirely.
    `pack=False` leaves FBGEMM's packing of the dynamic int8 layers (most of a cached
    load) to `settle`, listed in `report.packs`; until then those layers multiply with
    the weight-only int8 kernel.
    """
    from modeldeploy.server.engine.weights import _part_rows, gguf_target, unpermute_qk

    policy = policy or QuantPolicy()
    report = QuantReport()
    spec = model.spec
    by_module: dict[str, list[tuple[int, GGUFPart]]] = {}
    for info in gguf.tensors:
        target = gguf_target(info.name)
        if target is None or target.expert is not None or len(info.shape) != 2:
            continue
        if not target.param.endswith(".weight") or target.param == "embed.weight":
            continue
        module_name = target.param.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear):
            continue  # MoE expert stacks and routers stay dense
        n = int(info.shape[0])
        order = None
        if permuted and target.part in ("q", "k"):
            heads = spec.num_heads if target.part == "q" else spec.num_kv_heads
            order = unpermute_qk(torch.arange(n)[:, None], heads)[:, 0].numpy()
        span = _part_rows(model, target.param, target.part)
        offset = span[0] if span else 0
        part = GGUFPart(
            info.ggml_type, gguf.raw(info.name), (n, int(info.shape[1])), order, info.name
        )
        by_module.setdefault(module_name, []).append((offset, part))

    tie = "lm_head" not in by_module and getattr(spec, "tie_word_embeddings", False)
    embed_info = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    if tie and embed_info is not None:
        part = GGUFPart(
            embed_info.ggml_type,
            gguf.raw(embed_info.name),
            (int(embed_info.shape[0]), int(embed_info.shape[1])),
            None,
            embed_info.name,
        )
        by_module["lm_head"] = [(0, part)]

    for module_name, parts in list(by_module.items()):
        parts.sort(key=lambda op: op[0])
        if sum(p.shape[0] for _, p in parts) != model.get_submodule(module_name).out_features:
            del by_module[module_name]  # partial checkpoint: let the normal loader report it

    cache_file = cached = None
    if cache_dir is not None and torch.device(device).type == "cpu" and gguf.path:
        cache_file = conversion_cache_file(Path(cache_dir), Path(gguf.path), policy, dtype)
        cached = _load_cache(cache_file, set(by_module))
        log.info("quantization cache %s: %s", "hit" if cached else "miss", cache_file)
    fresh: dict[str, Any] = {}
    to_pack: list[_Int8] = []
    to_move: list[Segment] = []
    total = len(by_module)
    for done, (module_name, parts) in enumerate(by_module.items(), 1):
        module = model.get_submodule(module_name)
        head = parts[0][1] if module_name == "lm_head" and len(parts) == 1 else None
        rescore = (
            head is not None
            and head.row_order is None
            and torch.device(device).type == "cpu"
            and cpu_kernels_available()
            and policy.rescores(head.ggml_type, head.shape[0])
        )
        layer_policy = coarse_head_policy() if rescore else policy
        fast: _Int8 | None = None
        if cached is not None:
            entry = cached[module_name]
            segments = [segment_from_state(st) for st in entry["segments"]]
            layer = QuantLinear(segments, int(entry["in_features"]), module.bias is not None)
        else:
            layer = QuantLinear.from_gguf_parts(
                [p for _, p in parts],
                dtype,
                device=device,
                bias=module.bias is not None,
                policy=layer_policy,
            )
            fresh[module_name] = {
                "in_features": layer.in_features,
                "segments": [segment_state(seg) for seg in layer.segments],
            }
        if rescore and wants_fast_head(layer):
            use_fast = policy.dynamic_int8 and dynamic_int8_available()
            if cached is not None:
                if use_fast and entry.get("fast") is not None:
                    fast = segment_from_state(entry["fast"])  # type: ignore[assignment]
            else:  # cached whatever this start's FBGEMM: the key ignores it
                fast_layer = QuantLinear.from_gguf_parts(
                    [p for _, p in parts], dtype, device=device, policy=FAST_HEAD_POLICY
                )
                only = fast_layer.segments[0]
                if len(fast_layer.segments) == 1 and isinstance(only, _Int8):
                    fresh[module_name]["fast"] = segment_state(only)
                    fast = only if use_fast else None
        dynamic = policy.dynamic_int8 and module_name.endswith(DYNAMIC_INT8_MODULES)
        packing = []  # FBGEMM packs these, which replaces their mapped weight anyway
        if dynamic and dynamic_int8_available():
            packing = [seg for seg in layer.segments if isinstance(seg, _Int8)]
            to_pack += packing
        if cached is not None and fast is None:  # a coarse pass to be replaced stays put
            # a block-kernel gate|up has nothing to pack, and moves like any other layer
            to_move += [seg for seg in layer.segments if not any(seg is p for p in packing)]
        if rescore:
            exact = QuantEmbedding(head.ggml_type, head.raw, head.shape, torch.float32, device)
            layer = RescoredHead(layer, exact, fast, mapped=cached is not None)
            if fast is not None:
                report.heads.append(layer)
        if module.bias is not None:  # stays where the model's parameters are (meta: unfilled)
            # torch.empty, not empty_like: on a meta tensor the latter imports sympy (0.4 s)
            empty = torch.empty(
                module.bias.shape, dtype=module.bias.dtype, device=module.bias.device
            )
            layer.bias = nn.Parameter(empty, requires_grad=False)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        report.consumed.update(p.name for _, p in parts if p.name != "token_embd.weight")
        report.layers[module_name] = layer.schemes
        report.nbytes += layer.nbytes
        if progress:
            progress(done, total, "quantized layers")
    if cache_file is not None and cached is None and fresh:
        _save_cache(cache_file, fresh)
    if pack:
        _enable_dynamic_all(to_pack, mapped=cached is not None)
    else:
        report.packs = to_pack
    report.mapped = to_move
    report.cache = str(cache_file) if cache_file else None
    report.cache_hit = cached is not None

    if quantize_embedding and embed_info is not None and isinstance(model.embed, nn.Embedding):
        model.embed = QuantEmbedding(
            embed_info.ggml_type,
            gguf.raw(embed_info.name),
            (int(embed_info.shape[0]), int(embed_info.shape[1])),
            dtype,
            device,
        )
        report.consumed.add(embed_info.name)
    log.info("quantized GGUF linears: %s", report.summary())
    return report
