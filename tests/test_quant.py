"""Quantized linear layers built from GGUF blocks, against gguf-py's dequantizers.

Tolerances: the exact int4 conversions (Q4_0/Q4_1/Q4_K) must reproduce gguf-py's float32
weights to float32 rounding (rtol 1e-6) before bf16; inside the kernel the per-group
scale/zero are bf16, so the weight a layer multiplies by may differ by 2^-8 of the
tensor's largest weight. Layer outputs (bf16 activations in, bf16 out) must be within
2 % of the largest output of F.linear on the reference weights; int8 requantization of
Q8_0/Q5_0 adds at most half a per-row step, checked at 3 %.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from modeldeploy.server.engine import quant
from modeldeploy.server.engine.quant import (
    GGUFPart,
    QuantEmbedding,
    QuantLinear,
    QuantPolicy,
    QuantPolicyError,
    Scheme,
)
from proc_maps import linux_only, resident_kb

Q = GGMLQuantizationType

#: `auto` with torch's int4/int8 kernels only: what these tests exercise, whatever the CPU.
TORCH_KERNELS = QuantPolicy(blocks=False)

pytestmark = pytest.mark.skipif(
    not quant.cpu_kernels_available(), reason="torch build lacks the CPU int4/int8 kernels"
)


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF bytes (rows, bytes_per_row): gguf-py's quantizer where it has one,
    else hand-built Q4_K super-blocks (random f16 d/dmin, 6-bit scales/mins, nibbles)."""
    rng = np.random.default_rng(seed)
    if qtype != Q.Q4_K:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        w *= rng.uniform(0.1, 2.0, size=(rows, 1)).astype(np.float32)
        return gguf_quants.quantize(w, qtype)
    size = GGML_QUANT_SIZES[Q.Q4_K][1]
    n = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.05, size=n).astype(np.float16)
    dmin = rng.uniform(0.0, 0.05, size=n).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, cols // 256 * size)


def reference(qtype: GGMLQuantizationType, raw: np.ndarray, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(-1, cols).copy())


def assert_close_to_linear(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float):
    ref = F.linear(x.to(torch.bfloat16).float(), w)
    err = (y.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_codes_reproduce_gguf_dequantization_exactly(qtype):
    rows, cols = 48, 512
    raw = random_blocks(qtype, rows, cols)
    codes, scale, zero = quant.int4_codes(qtype, raw, rows, cols)
    assert codes.min() >= 0 and codes.max() <= 15
    w = (codes.reshape(rows, -1, 32).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    np.testing.assert_allclose(
        w.reshape(rows, cols), reference(qtype, raw, cols), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_exact_int4_layer_matches_dequantized_linear(qtype):
    rows, cols = 80, 512  # 80 = one full 64-row packing block + a 16-row tail
    raw = random_blocks(qtype, rows, cols, seed=1)
    layer = QuantLinear.from_gguf(qtype, raw, (rows, cols), torch.bfloat16, policy=TORCH_KERNELS)
    assert layer.schemes == ["int4"]
    w = reference(qtype, raw, cols)
    assert (layer.dequantized() - w).abs().max() <= 2**-8 * w.abs().max()
    x = torch.randn(5, cols)
    assert_close_to_linear(layer(x), x, w, rel=0.02)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0])
def test_requantized_int8_layer_matches_dequantized_linear(qtype):
    rows, cols = 96, 256
    raw = random_blocks(qtype, rows, cols, seed=2)
    # Q5_0 without the Q5_0 kernel (tests/test_block_kernel.py has it with the kernel)
    policy = TORCH_KERNELS
    layer = QuantLinear.from_gguf(qtype, raw, (rows, cols), torch.float32, policy=policy)
    assert layer.schemes == ["int8"]
    w = reference(qtype, raw, cols)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.dequantized() - w).abs() <= step * 0.51 + 2**-8 * w.abs()).all()
    x = torch.randn(3, cols)
    y = layer(x)
    assert y.dtype == torch.float32
    assert_close_to_linear(y, x, w, rel=0.03)


def test_int4_policy_requantizes_q8_0_within_a_group_step():
    rows, cols = 32, 256
    raw = random_blocks(Q.Q8_0, rows, cols, seed=3)
    layer = QuantLinear.from_gguf(
        Q.Q8_0, raw, (rows, cols), torch.bfloat16, policy=QuantPolicy.parse("int4")
    )
    assert layer.schemes == ["int4"]
    w = reference(Q.Q8_0, raw, cols).reshape(rows, -1, 32)
    step = (w.amax(-1) - w.amin(-1)) / 15
    err = (layer.dequantized().reshape(rows, -1, 32) - w).abs().amax(-1)
    assert (err <= step * 0.5 + 2**-7 * w.abs().amax(-1)).all()


def test_batched_and_3d_inputs_match_row_by_row():
    rows, cols = 64, 256
    layer = QuantLinear.from_gguf(
        Q.Q4_0, random_blocks(Q.Q4_0, rows, cols), (rows, cols), torch.bfloat16
    )
    x = torch.randn(2, 7, cols, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 7, rows) and y.dtype == torch.bfloat16
    single = torch.stack(
        [torch.stack([layer(x[b, t][None])[0] for t in range(7)]) for b in range(2)]
    )
    torch.testing.assert_close(y.float(), single.float(), rtol=1e-2, atol=1e-2)


def test_fused_parts_of_mixed_types_keep_row_order_and_bias():
    cols = 256
    specs = [(Q.Q4_0, 64), (Q.Q4_K, 32), (Q.Q8_0, 32)]
    parts, refs = [], []
    for i, (qtype, rows) in enumerate(specs):
        raw = random_blocks(qtype, rows, cols, seed=10 + i)
        parts.append(GGUFPart(qtype, raw, (rows, cols)))
        refs.append(reference(qtype, raw, cols))
    layer = QuantLinear.from_gguf_parts(parts, torch.float32, bias=True, policy=TORCH_KERNELS)
    assert layer.schemes == ["int4", "int8"]  # Q4_0 and Q4_K share one int4 segment
    layer.bias.data = torch.randn(128)
    x = torch.randn(4, cols)
    w = torch.cat(refs)
    ref = F.linear(x.to(torch.bfloat16).float(), w, layer.bias)
    assert (layer(x) - ref).abs().max() <= 0.03 * ref.abs().max()


def test_row_order_reorders_quantized_rows_exactly():
    rows, cols = 32, 64
    raw = random_blocks(Q.Q8_0, rows, cols, seed=4)
    order = np.random.default_rng(0).permutation(rows)
    part = GGUFPart(Q.Q8_0, raw, (rows, cols), row_order=order)
    layer = QuantLinear.from_gguf_parts([part], torch.float32, policy=QuantPolicy.parse("dense"))
    torch.testing.assert_close(layer.dequantized(), reference(Q.Q8_0, raw, cols)[order])


def test_dense_fallback_without_kernels_is_exact(monkeypatch):
    monkeypatch.setattr(quant, "cpu_kernels_available", lambda: False)
    rows, cols = 40, 64  # also not a multiple of 16 rows
    raw = random_blocks(Q.Q4_0, rows, cols)
    layer = QuantLinear.from_gguf(Q.Q4_0, raw, (rows, cols), torch.float32)
    assert layer.schemes == ["dense"]
    x = torch.randn(3, cols)
    torch.testing.assert_close(layer(x), F.linear(x, reference(Q.Q4_0, raw, cols)))


def test_int4_rows_not_multiple_of_16_fall_back_to_int8():
    rows, cols = 40, 64
    layer = QuantLinear.from_gguf(
        Q.Q4_0,
        random_blocks(Q.Q4_0, rows, cols),
        (rows, cols),
        torch.bfloat16,
        policy=TORCH_KERNELS,
    )
    assert layer.schemes == ["int8"]


def test_chunked_packing_equals_whole_packing(monkeypatch):
    codes = torch.randint(0, 16, (80, 128), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    torch.testing.assert_close(quant.pack_int4(codes), whole)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_from_float_group_sizes(group):
    w = torch.randn(64, 512)
    layer = QuantLinear.from_float(w, Scheme.INT4, group_size=group)
    assert layer.schemes == ["int4"]
    x = torch.randn(2, 512)
    assert_close_to_linear(layer(x), x, w, rel=0.2 if group > 32 else 0.15)
    assert (layer.dequantized() - w).abs().max() < 0.5 * w.abs().max() / 7


def test_embedding_dequantizes_only_looked_up_rows():
    rows, cols = 50, 64
    raw = random_blocks(Q.Q5_0, rows, cols, seed=5)
    emb = QuantEmbedding(Q.Q5_0, raw, (rows, cols), torch.float32)
    tokens = torch.tensor([[3, 7, 3], [49, 0, 7]])
    out = emb(tokens)
    assert out.shape == (2, 3, cols)
    torch.testing.assert_close(out, reference(Q.Q5_0, raw, cols)[tokens])


def test_policy_names():
    blocks = quant.block_kernel.available()
    assert QuantPolicy.parse(None).scheme_for(Q.Q5_0) == (Scheme.Q5_0 if blocks else Scheme.INT8)
    assert QuantPolicy.parse(None).scheme_for(Q.Q6_K) == (Scheme.Q7 if blocks else Scheme.INT8)
    assert QuantPolicy.parse("auto").scheme_for(Q.Q4_K) == (Scheme.Q4 if blocks else Scheme.INT4)
    assert QuantPolicy.parse("int4").scheme_for(Q.Q4_K) == Scheme.INT4
    assert QuantPolicy.parse("int8").scheme_for(Q.Q5_0) == Scheme.INT8
    assert TORCH_KERNELS.scheme_for(Q.Q4_K) == Scheme.INT4
    assert QuantPolicy.parse("int4").scheme_for(Q.Q6_K) == Scheme.INT4
    assert QuantPolicy.parse("dense").scheme_for(Q.Q4_0) == Scheme.DENSE
    assert QuantPolicy.parse("int8").scheme_for(Q.F16) == Scheme.DENSE
    with pytest.raises(QuantPolicyError, match="quant policy 'fp8'"):
        QuantPolicy.parse("fp8")


def test_int4_codes_unpack_inverts_the_cpu_packer():
    codes = torch.randint(0, 16, (192, 256), dtype=torch.uint8)
    seg = quant._Int4(quant.pack_int4(codes), torch.ones(8, 192, 2, dtype=torch.bfloat16), 32)
    assert torch.equal(seg.codes(), codes)


@pytest.mark.parametrize(
    ("scheme", "m"),
    [(Scheme.INT4, 2 * quant.DEQUANT_MIN_ROWS), (Scheme.INT8, quant.DEQUANT_MIN_ROWS)],
)
def test_prompt_sized_inputs_take_the_dequantized_path_with_the_same_result(scheme, m):
    w = torch.randn(128, 256)
    layer = QuantLinear.from_float(w, scheme)
    x = torch.randn(m, 256)
    chunked = torch.cat([layer(x[i : i + 8]) for i in range(0, m, 8)])  # kernel path
    torch.testing.assert_close(layer(x), chunked, rtol=2e-2, atol=2e-2 * chunked.abs().max().item())


def test_rescored_head_gives_exact_logits_for_each_rows_best_tokens():
    """A large-vocabulary Q8_0 head held as int4: the tokens a sampler can pick (each
    row's top candidates) carry the file's exact logits, the ranking at the top equals
    the float head's, and the tail stays within int4 error."""
    vocab, hidden = quant.RESCORE_MIN_VOCAB + 4096, 128
    raw = random_blocks(Q.Q8_0, vocab, hidden, seed=7)
    policy = QuantPolicy.parse("auto")
    assert policy.rescores(Q.Q8_0, vocab)
    assert not policy.rescores(Q.Q8_0, 1024)  # small heads stay int8: cheap already
    assert not policy.rescores(Q.Q4_K, vocab)  # exact int4 needs no rescoring
    assert not QuantPolicy.parse("int8").rescores(Q.Q8_0, vocab)
    coarse = QuantLinear.from_gguf(
        Q.Q8_0, raw, (vocab, hidden), torch.bfloat16, policy=quant.COARSE_HEAD_POLICY
    )
    head = quant.RescoredHead(coarse, QuantEmbedding(Q.Q8_0, raw, (vocab, hidden), torch.float32))
    assert head.schemes == ["int4+rescored"]
    assert coarse.segments[0].group == 128  # the coarse pass may use a coarser grid
    assert head.nbytes < vocab * hidden * 0.6  # int4 + scales: well under int8's 1 B/weight
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = x.float() @ reference(Q.Q8_0, raw, hidden).T
    got = head(x)
    assert got.shape == (3, vocab) and got.dtype == torch.float32
    top = want.topk(8, dim=-1)
    assert torch.equal(got.topk(8, dim=-1).indices, top.indices)
    torch.testing.assert_close(got.gather(1, top.indices), top.values, rtol=1e-5, atol=1e-5)
    coarse_err = (coarse(x).float() - want).abs().max()
    assert (got - want).abs().max() <= coarse_err + 1e-5
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@pytest.mark.skipif(not quant.dynamic_int8_available(), reason="no FBGEMM dynamic linear")
def test_rescored_head_sped_up_keeps_its_exact_top_and_tightens_the_tail():
    """After `speed_up` (FBGEMM int8 rows instead of int4) the tokens a sampler can pick
    still carry the file's exact logits, so greedy choices are the same as before the
    swap, and the tail is nearer the file's logits than int4's was."""
    vocab, hidden = quant.RESCORE_MIN_VOCAB + 4096, 128
    raw = random_blocks(Q.Q8_0, vocab, hidden, seed=11)
    coarse = QuantLinear.from_gguf(
        Q.Q8_0, raw, (vocab, hidden), torch.bfloat16, policy=quant.COARSE_HEAD_POLICY
    )
    fast = QuantLinear.from_gguf(
        Q.Q8_0, raw, (vocab, hidden), torch.bfloat16, policy=quant.FAST_HEAD_POLICY
    ).segments[0]
    exact = QuantEmbedding(Q.Q8_0, raw, (vocab, hidden), torch.float32)
    head = quant.RescoredHead(coarse, exact, fast)
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = x.float() @ reference(Q.Q8_0, raw, hidden).T
    before = head(x)
    head.speed_up()
    assert head.schemes == ["int8+rescored"] and head.fast is None
    after = head(x)
    top = want.topk(8, dim=-1)
    assert torch.equal(after.topk(8, dim=-1).indices, top.indices)
    torch.testing.assert_close(after.gather(1, top.indices), top.values, rtol=1e-5, atol=1e-5)
    assert after.argmax(-1).tolist() == before.argmax(-1).tolist()
    assert (after - want).abs().mean() < (before - want).abs().mean()
    # a row alone picks the same token it picks in the batch
    assert head(x[2:3]).argmax(-1).item() == after[2].argmax().item()
    head.speed_up()  # a second call is a no-op
    assert head.schemes == ["int8+rescored"]


@linux_only
@pytest.mark.skipif(not quant.dynamic_int8_available(), reason="no FBGEMM dynamic linear")
def test_sped_up_cached_head_hands_back_both_passes_file_pages(tmp_path):
    """On a cache hit both passes are read through the cache file's mapping: after the
    swap neither the replaced int4 pass nor the packed int8 rows stay resident there, and
    a head larger than one FBGEMM segment still picks the same tokens."""
    vocab, hidden = 2 * quant.FAST_HEAD_ROWS, 256
    raw = random_blocks(Q.Q8_0, vocab, hidden, seed=13)
    passes = {
        name: QuantLinear.from_gguf(Q.Q8_0, raw, (vocab, hidden), torch.bfloat16, policy=p)
        for name, p in (("coarse", quant.COARSE_HEAD_POLICY), ("fast", quant.FAST_HEAD_POLICY))
    }
    torch.save(
        {k: quant.segment_state(v.segments[0]) for k, v in passes.items()}, tmp_path / "c.pt"
    )
    cached = torch.load(tmp_path / "c.pt", mmap=True, weights_only=True)
    coarse = QuantLinear([quant.segment_from_state(cached["coarse"])], hidden, bias=False)
    exact = QuantEmbedding(Q.Q8_0, raw, (vocab, hidden), torch.float32)
    fast = quant.segment_from_state(cached["fast"])
    head = quant.RescoredHead(coarse, exact, fast, mapped=True)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    before = head(x)  # reads the whole int4 pass through the mapping
    packed = coarse.segments[0].packed
    int4_kb = packed.numel() // 1024
    assert resident_kb(packed.data_ptr()) >= int4_kb
    head.speed_up()
    assert head.schemes == ["int8+rescored"] * 2  # two FBGEMM segments
    assert resident_kb(packed.data_ptr()) < int4_kb // 4
    assert head(x).argmax(-1).tolist() == before.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [151936, 4096 + 17, 64 * 64, 100])
def test_top_candidates_finds_the_same_tokens_as_a_full_topk(vocab):
    """The two-pass search returns each row's k best tokens, including when they crowd
    into one block, sit in the partial last block, or the vocabulary is small."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g)
    logits[1, 128:192] += 50.0  # all of row 1's winners in one block
    logits[2, -(vocab % 64 or 64) :] += 50.0  # row 2's in the last, partial block
    logits[3, ::97] += 50.0  # row 3's spread one per block
    k = min(64, vocab)
    got = quant.top_candidates(logits, k)
    want = logits.topk(k, dim=-1).indices
    assert got.shape == (4, k)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


needs_fbgemm = pytest.mark.skipif(
    not quant.dynamic_int8_available(), reason="torch build lacks FBGEMM's dynamic linear"
)


@needs_fbgemm
def test_dynamic_int8_rows_are_independent_of_their_batch():
    """Each decode row is rounded on its own range: a row with a 1000x outlier in the
    same batch changes nothing for the others, and a row alone gives the same bits."""
    rows, cols = 64, 256
    raw = random_blocks(Q.Q8_0, rows, cols, seed=5)
    int8 = quant.QuantPolicy(blocks=False)  # not the block kernel's 7-bit blocks
    layer = QuantLinear.from_gguf(Q.Q8_0, raw, (rows, cols), torch.bfloat16, policy=int8)
    exact = layer.dequantized()
    for seg in layer.segments:
        seg.enable_dynamic()
    assert layer.segments[0].weight is None  # the packed copy replaced it
    torch.testing.assert_close(layer.dequantized(), exact, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, cols, generator=gen).to(torch.bfloat16)
    x[3, 17] = 1000.0
    batched = layer(x)
    for i in range(x.shape[0]):
        assert torch.equal(layer(x[i : i + 1]), batched[i : i + 1])
    want = x.float() @ exact.T
    xf = x.float()
    half_step = (xf.amax(-1) - xf.amin(-1)) / 255 / 2  # 8 bits over the row's own range
    for i in range(x.shape[0]):
        bound = half_step[i] * exact.abs().sum(1) + 2**-8 * want[i].abs() + 1e-3
        assert ((batched[i].float() - want[i]).abs() <= bound).all(), i
    # the outlier row's coarse grid stays its own: the other rows are as exact as alone
    others = [0, 1, 2, 4, 5]
    rel = (batched[others].float() - want[others]).abs().amax(-1) / want[others].abs().amax(-1)
    assert (rel < 0.02).all(), rel


@linux_only
def test_embedding_rows_from_a_mapped_file_do_not_stay_resident(tmp_path):
    """Rows looked up in a table that lives in a file mapping (the GGUF: token lookups,
    the rescored head's 64 exact rows a step) are read from the file, not through the
    mapping, so the table never becomes part of the process's RSS; the rows are the
    file's, at any offset of the file."""
    rows, cols = 4096, 256
    raw = random_blocks(Q.Q8_0, rows, cols, seed=3)
    path = tmp_path / "model.bin"
    header = b"x" * 1000  # the table starts mid-page, like a GGUF tensor
    path.write_bytes(header + raw.tobytes() + b"tail")
    file = np.memmap(path, dtype=np.uint8, mode="r")
    table = file[len(header) : len(header) + raw.nbytes].reshape(raw.shape)
    emb = QuantEmbedding(Q.Q8_0, table, (rows, cols), torch.float32)
    assert emb.file_rows is not None
    want = reference(Q.Q8_0, raw, cols)
    for ids in (torch.arange(0, rows, 7), torch.tensor([[rows - 1, 0], [5, 5]])):
        torch.testing.assert_close(emb(ids), want[ids], rtol=0, atol=0)
    assert resident_kb(table.ctypes.data) == 0
    in_memory = QuantEmbedding(Q.Q8_0, raw, (rows, cols), torch.float32)
    assert in_memory.file_rows is None
    torch.testing.assert_close(in_memory(torch.tensor([3])), want[[3]], rtol=0, atol=0)
