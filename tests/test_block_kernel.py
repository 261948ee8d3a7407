"""The block kernel (server/engine/block_kernel.c): Q5_0 weights exactly and other types as
7-bit blocks, Q8_0-rounded activations, rows independent of their batch, and a clear
fallback where it cannot be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from modeldeploy.server.engine import block_kernel, quant
from modeldeploy.server.engine.quant import QuantLinear, QuantPolicy

Q = GGMLQuantizationType

needs_kernel = pytest.mark.skipif(
    not block_kernel.available(), reason=str(block_kernel.unavailable())
)


def q5_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q5_0 rows from gguf-py's quantizer, with per-row magnitudes 20x apart and
    one row of extreme codes (0 and 31), which hit the kernel's int16 sums hardest."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= rng.uniform(0.1, 2.0, size=(rows, 1)).astype(np.float32)
    w[0] = np.where(np.arange(cols) % 2, 1.0, -1.0) * 3.0
    return gguf_quants.quantize(w, Q.Q5_0)


def reference_weight(raw: np.ndarray, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(raw, Q.Q5_0).reshape(-1, cols).copy())


def q8_0_rounded(x: torch.Tensor) -> torch.Tensor:
    """Activations as the kernel rounds them: int8 per block of 32, scale amax / 127."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return (q * d).reshape(x.shape)


@needs_kernel
def test_packed_weights_are_the_files_weights_exactly():
    rows, cols = 48, 320
    raw = q5_blocks(rows, cols)
    packed = block_kernel.pack_q5(raw, cols)
    assert packed.shape == (rows // 8, cols // 32, block_kernel.Q5_RECORD)
    assert torch.equal(block_kernel.dequantize(packed), reference_weight(raw, cols))
    # 5.5 bits a weight, as in the file
    assert packed.numel() == raw.size


@needs_kernel
def test_7_bit_blocks_round_each_weight_to_its_blocks_grid():
    rows, cols = 40, 256
    w = torch.randn(rows, cols) * torch.logspace(-3, 1, rows)[:, None]
    w[5, :32] = 0.0  # an all-zero block
    packed = block_kernel.pack_q7(w.numpy())
    assert packed.shape == (rows // 8, cols // 32, block_kernel.Q7_RECORD)
    back = block_kernel.dequantize(packed)
    step = w.reshape(rows, -1, 32).abs().amax(-1, keepdim=True) / 63
    err = (back - w).reshape(rows, -1, 32).abs()
    assert (err <= step * (0.5 + 2**-9)).all()  # half a step, plus the fp16 scale's rounding
    assert (back[5, :32] == 0).all()


def q7_packed(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q7 records of random weights whose rows differ 100x in size, and their values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-1, 1, rows)[:, None]
    packed = block_kernel.pack_q7(w.numpy())
    return packed, block_kernel.dequantize(packed)


def q4k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K rows (gguf-py has no Q4_K quantizer): random codes, 6-bit scales and
    minimums, and per-row super-block scales 30x apart."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    row_scale = np.repeat(rng.uniform(1e-3, 3e-2, rows), cols // 256)
    blocks[:, 0:2] = row_scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    blocks[:, 2:4] = (row_scale / 2).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return blocks.reshape(rows, -1)


def q4_packed(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4 records of random Q4_K rows, and the weights they hold."""
    raw = q4k_blocks(rows, cols, seed)
    codes, scale, zero = quant.int4_codes(Q.Q4_K, raw, rows, cols)
    packed = block_kernel.pack_q4(codes, scale, 8.0 * scale - zero)
    return packed, block_kernel.dequantize(packed)


def packed_of(kind: str, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "q5":
        raw = q5_blocks(rows, cols, seed=seed)
        return block_kernel.pack_q5(raw, cols), reference_weight(raw, cols)
    return (q7_packed if kind == "q7" else q4_packed)(rows, cols, seed)


@needs_kernel
def test_4_bit_blocks_hold_q4_k_and_q4_0_weights():
    rows, cols = 16, 512
    raw = q4k_blocks(rows, cols, seed=11)
    packed, back = q4_packed(rows, cols, seed=11)
    assert packed.shape == (rows // 8, cols // 32, block_kernel.Q4_RECORD)
    w = torch.from_numpy(gguf_quants.dequantize(raw, Q.Q4_K).reshape(rows, cols).copy())
    # only Q4_K's per-32 scale and minimum are rounded (to fp16)
    span = w.reshape(rows, -1, 32).abs().amax(-1, keepdim=True)
    assert ((back - w).reshape(rows, -1, 32).abs() <= span * 2**-9).all()
    # Q4_0 (w = (code - 8) * d) fits exactly
    q40 = gguf_quants.quantize(np.random.default_rng(12).standard_normal((rows, cols)), Q.Q4_0)
    layer = QuantLinear.from_gguf(Q.Q4_0, q40, (rows, cols), torch.float32)
    assert layer.schemes == ["q4"]
    exact = gguf_quants.dequantize(q40, Q.Q4_0).reshape(rows, cols)
    assert torch.equal(layer.dequantized(), torch.from_numpy(exact.copy()))


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q5", "q7"])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_product_is_exact_for_q8_0_rounded_activations(kind, m):
    rows, cols = 64, 256
    packed, w = packed_of(kind, rows, cols, seed=1)
    w = w.double()
    x = torch.randn(m, cols) * torch.logspace(-2, 1, m)[:, None]
    y = block_kernel.linear(x, packed)
    assert y.dtype == torch.float32 and y.shape == (m, rows)
    ref = F.linear(q8_0_rounded(x).double(), w)
    # integer sums are exact; only the float32 sum over blocks rounds
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and the rounding itself costs little against the float product
    err = (y.double() - F.linear(x.double(), w)).abs().max() / ref.abs().max()
    assert err < 0.02


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q5", "q7"])
def test_a_row_gives_the_same_bits_alone_or_in_any_batch(kind):
    rows, cols = 96, 1024
    packed = packed_of(kind, rows, cols, seed=2)[0]
    x = torch.randn(13, cols)
    batch = block_kernel.linear(x, packed)
    for i in (0, 5, 12):
        assert torch.equal(block_kernel.linear(x[i : i + 1], packed)[0], batch[i])
    assert torch.equal(block_kernel.linear(x[3:9], packed), batch[3:9])


@needs_kernel
@pytest.mark.skipif(
    block_kernel.variant() != "vnni", reason="the CPU has no AVX-512 VNNI to compare"
)
@pytest.mark.parametrize("kind", ["q4", "q5", "q7"])
def test_the_vnni_build_gives_the_avx2_builds_bits(kind):
    rows, cols = 64, 1024
    packed = packed_of(kind, rows, cols, seed=5)[0]
    x = torch.randn(9, cols) * 30
    wide = block_kernel._linear(x, packed, build="vnni")
    assert torch.equal(wide, block_kernel._linear(x, packed, build="avx2"))


@needs_kernel
@pytest.mark.parametrize("kind", ["q4", "q5", "q7"])
def test_widened_to_bf16_each_weight_rounds_once(kind):
    packed, w = packed_of(kind, 48, 512, seed=13)
    assert torch.equal(block_kernel.to_bf16(packed), w.to(torch.bfloat16))


@needs_kernel
def test_prompt_chunks_multiply_the_same_weights():
    """A prompt-sized chunk may take the bf16 GEMM (native-bf16 CPUs) instead of the
    integer product: the weights are the same, only the activations' rounding differs."""
    rows, cols = 64, 512
    packed, w = packed_of("q5", rows, cols, seed=14)
    layer = quant._Blocks(packed)
    x = torch.randn(quant.DEQUANT_MIN_ROWS + 3, cols).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    got = layer(x).double()
    assert got.shape == (x.shape[0], rows)
    assert ((got - ref).abs().amax(-1) <= 0.02 * ref.abs().amax(-1)).all()


@needs_kernel
def test_bf16_rows_are_read_as_they_are():
    rows, cols = 32, 128
    packed = block_kernel.pack_q5(q5_blocks(rows, cols, seed=3), cols)
    x = torch.randn(4, cols).to(torch.bfloat16)
    assert torch.equal(block_kernel.linear(x, packed), block_kernel.linear(x.float(), packed))


@needs_kernel
def test_a_non_finite_input_poisons_only_its_own_row():
    rows, cols = 16, 64
    packed = block_kernel.pack_q5(q5_blocks(rows, cols, seed=4), cols)
    x = torch.randn(3, cols)
    x[1, 40] = float("nan")
    y = block_kernel.linear(x, packed)
    assert y[1].isnan().all()
    assert y[[0, 2]].isfinite().all()


@needs_kernel
def test_layers_keep_q5_0_blocks_and_fall_back_to_int8_where_they_do_not_fit():
    cols = 256
    raw = q5_blocks(48, cols, seed=5)
    layer = QuantLinear.from_gguf(Q.Q5_0, raw, (48, cols), torch.float32)
    assert layer.schemes == ["q5_0"]
    assert layer.nbytes == raw.size
    x = torch.randn(2, cols)
    torch.testing.assert_close(
        layer(x), block_kernel.linear(x, block_kernel.pack_q5(raw, cols)), rtol=0, atol=0
    )
    # 36 rows are not whole groups of 8: int8 as before
    odd = QuantLinear.from_gguf(Q.Q5_0, raw[:36], (36, cols), torch.float32)
    assert odd.schemes == ["int8"]
    # other inexact types become 7-bit blocks, within half a block's step of the file
    rng = np.random.default_rng(3)
    q6k = rng.integers(0, 256, size=(48 * cols // 256, 210), dtype=np.uint8)  # random codes
    q6k[:, 208:] = rng.uniform(1e-3, 1e-2, (len(q6k), 1)).astype(np.float16).view(np.uint8)
    for qtype in (Q.Q8_0, Q.Q6_K):
        other_raw = (
            gguf_quants.quantize(rng.standard_normal((48, cols)), qtype)
            if qtype == Q.Q8_0
            else q6k.reshape(48, -1)
        )
        other = QuantLinear.from_gguf(qtype, other_raw, (48, cols), torch.float32)
        assert other.schemes == ["q7"], qtype
        w = torch.from_numpy(gguf_quants.dequantize(other_raw, qtype).reshape(48, -1, 32))
        step = w.abs().amax(-1, keepdim=True) / 63
        err = (other.dequantized().reshape(48, -1, 32) - w).abs()
        assert (err <= step * (0.5 + 2**-9)).all()
    # the policies that promise other kernels keep them
    for name, scheme in (("int8", "int8"), ("int4", "int4"), ("dense", "dense")):
        other = QuantLinear.from_gguf(
            Q.Q5_0, raw, (48, cols), torch.float32, policy=QuantPolicy.parse(name)
        )
        assert other.schemes == [scheme], name


@needs_kernel
def test_fused_q5_0_and_q8_0_parts_keep_their_rows_in_order():
    cols = 128
    a, b = q5_blocks(24, cols, seed=6), q5_blocks(16, cols, seed=7)
    c = gguf_quants.quantize(np.random.default_rng(8).standard_normal((8, cols)), Q.Q8_0)
    parts = [
        quant.GGUFPart(Q.Q5_0, a, (24, cols)),
        quant.GGUFPart(Q.Q5_0, b, (16, cols)),
        quant.GGUFPart(Q.Q8_0, c, (8, cols)),
    ]
    layer = QuantLinear.from_gguf_parts(parts, torch.float32)
    assert layer.schemes == ["q5_0", "q7"]
    w = torch.cat([reference_weight(a, cols), reference_weight(b, cols)])
    assert torch.equal(layer.dequantized()[:40], w)
    x = torch.randn(3, cols)
    torch.testing.assert_close(layer(x)[:, :40], F.linear(q8_0_rounded(x), w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_conversion_cache_state_round_trips():
    cols = 96
    layer = QuantLinear.from_gguf(Q.Q5_0, q5_blocks(16, cols, seed=9), (16, cols), torch.float32)
    state = quant.segment_state(layer.segments[0])
    again = quant.segment_from_state(state)
    x = torch.randn(2, cols)
    assert torch.equal(again(x), layer.segments[0](x))


@needs_kernel
def test_compiled_graph_runs_the_kernel_with_the_same_bits():
    block_kernel.define_op()
    rows, cols = 64, 128
    packed = block_kernel.pack_q5(q5_blocks(rows, cols, seed=10), cols)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(block_kernel.linear(x * 2, packed)) * 2  # exact ops around it

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    x = torch.randn(3, cols)
    assert torch.equal(compiled(x), f(x))


def test_without_a_compiler_it_says_why_and_layers_stay_int8(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELDEPLOY_CACHE", str(tmp_path))  # no built kernel there
    monkeypatch.setattr(block_kernel, "_compiler", lambda: None)
    block_kernel._library.cache_clear()
    block_kernel.unavailable.cache_clear()
    try:
        reason = block_kernel.unavailable()
        assert reason is not None
        if "CPU lacks" not in reason and "x86" not in reason:
            assert "no C compiler" in reason
        raw = q5_blocks(16, 64)
        assert QuantLinear.from_gguf(Q.Q5_0, raw, (16, 64), torch.float32).schemes == ["int8"]
        assert not list(tmp_path.glob("kernels/*"))
    finally:
        block_kernel._library.cache_clear()
        block_kernel.unavailable.cache_clear()


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(block_kernel.ENV, "0")
    block_kernel.unavailable.cache_clear()
    try:
        assert block_kernel.unavailable() == f"{block_kernel.ENV}=0"
    finally:
        block_kernel.unavailable.cache_clear()
