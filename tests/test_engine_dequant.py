"""Our torch GGML decoders agree bit for bit with gguf-py's reference dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modeldeploy.server.engine import dequant

gguf = pytest.importorskip("gguf")

#: byte offsets of the float16 scale fields in each block (they must hold finite values)
F16_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q5_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


@pytest.mark.parametrize("type_name", sorted(dequant.DEQUANTIZERS))
def test_matches_gguf_py(type_name: str) -> None:
    block_bytes, block_elems, _ = dequant.DEQUANTIZERS[type_name]
    rows, blocks_per_row = 6, 2
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    scales = rng.uniform(-0.1, 0.1, size=(rows, blocks_per_row)).astype(np.float16)
    for off in F16_FIELDS[type_name]:
        raw[:, :, off : off + 2] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2)
    raw = raw.reshape(rows, -1)
    qtype = gguf.GGMLQuantizationType[type_name]
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, -1)
    got = dequant.dequantize(torch.from_numpy(raw), type_name)
    assert got.shape == (rows, blocks_per_row * block_elems)
    assert torch.equal(got, torch.from_numpy(np.asarray(want, dtype=np.float32)))


def test_unknown_type_falls_back() -> None:
    assert dequant.dequantize(torch.zeros(2, 10, dtype=torch.uint8), "IQ2_XS") is None
