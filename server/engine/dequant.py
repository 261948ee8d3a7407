"""GGML block formats decoded with vectorised torch ops (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K).

gguf-py's numpy dequantizers are exact but slow (≈45 s for a 0.5B Q4_K_M file on two
cores); the same arithmetic over whole tensors in torch takes about a second. Layouts
follow ggml-common.h; each function takes the raw bytes of a tensor as a uint8 tensor of
shape (rows, bytes_per_row) and returns float32 of shape (rows, elements_per_row). Types
not listed here fall back to the formats layer (gguf-py).
"""

from __future__ import annotations

import torch

QK = 32  # elements per block of the legacy formats
QK_K = 256  # elements per super-block of the k-quants


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from a (..., 2) uint8 view, as float32."""
    return b.contiguous().view(torch.float16).float()


def _blocks(raw: torch.Tensor, size: int) -> torch.Tensor:
    return raw.reshape(-1, size)


def q8_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 34)
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(raw.shape[0], -1)


def q4_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 18)
    d = _f16(b[:, :2])
    qs = b[:, 2:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).float() - 8.0
    return (d * q).reshape(raw.shape[0], -1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 -> (n, 8k) uint8 of their bits, little-endian (bit j of the word first)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[:, :, None] >> shifts) & 1).reshape(b.shape[0], -1)


def q5_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 22)
    d = _f16(b[:, :2])
    high = _bits(b[:, 2:6])  # bit j of the 32-bit qh is the fifth bit of element j
    qs = b[:, 6:]
    q = (torch.cat((qs & 0x0F, qs >> 4), dim=1) | (high << 4)).float() - 16.0
    return (d * q).reshape(raw.shape[0], -1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs packed in 12 bytes (get_scale_min_k4)."""
    s = scales.to(torch.int32)
    sc_lo = s[:, 0:4] & 63
    m_lo = s[:, 4:8] & 63
    sc_hi = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    m_hi = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((sc_lo, sc_hi), 1).float(), torch.cat((m_lo, m_hi), 1).float()


def q4_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # four 64-element chunks, 32 bytes each
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32).float()
    y = (d * sc)[:, :, None] * q - (dmin * m)[:, :, None]
    return y.reshape(raw.shape[0], -1)


def q5_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 176)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    # bit i of qh[l] is the fifth bit of element l of 32-element sub-block i
    high = _bits(b[:, 16:48]).reshape(-1, 32, 8).transpose(1, 2)
    qs = b[:, 48:].reshape(-1, 4, 32)
    low = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)
    q = (low | (high << 4)).float()
    y = (d * sc)[:, :, None] * q - (dmin * m)[:, :, None]
    return y.reshape(raw.shape[0], -1)


def q6_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 210)
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # (half, first/second 32 bytes, l)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
    d = _f16(b[:, 208:210])
    q1 = (ql[:, :, 0] & 0x0F) | ((qh & 3) << 4)
    q2 = (ql[:, :, 1] & 0x0F) | (((qh >> 2) & 3) << 4)
    q3 = (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[:, :, 1] >> 4) | (((qh >> 6) & 3) << 4)
    q = torch.stack((q1, q2, q3, q4), dim=2).float() - 32.0  # (n, half, 4, 32)
    # 16-element groups: scale index = 8*half + 2*k + (l >= 16)
    sc = scales.reshape(-1, 2, 4, 2, 1).expand(-1, 2, 4, 2, 16).reshape(-1, 2, 4, 32)
    y = d[:, :, None, None] * sc * q
    return y.reshape(raw.shape[0], -1)


#: type -> (bytes per block, elements per block, decoder)
DEQUANTIZERS = {
    "Q8_0": (34, QK, q8_0),
    "Q4_0": (18, QK, q4_0),
    "Q5_0": (22, QK, q5_0),
    "Q4_K": (144, QK_K, q4_k),
    "Q5_K": (176, QK_K, q5_k),
    "Q6_K": (210, QK_K, q6_k),
}

#: elements per piece, so temporaries stay a few tens of MB whatever the tensor size
CHUNK_ELEMENTS = 1 << 22


def dequantize(raw: torch.Tensor, type_name: str) -> torch.Tensor | None:
    """float32 (rows, elements) for a supported type, None to let the caller fall back."""
    if type_name not in DEQUANTIZERS:
        return None
    block_bytes, block_elems, fn = DEQUANTIZERS[type_name]
    raw = raw.reshape(raw.shape[0] if raw.dim() > 1 else 1, -1)
    rows = raw.shape[0]
    per_row = raw.shape[1] // block_bytes * block_elems
    out = torch.empty(rows, per_row, dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        out[start : start + step] = fn(raw[start : start + step])
    return out
