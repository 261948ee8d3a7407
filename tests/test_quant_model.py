"""quantize_gguf_model on the engine's Transformer, for each tiny GGUF architecture.

The reference is the same file loaded densely in float32 by the engine's own loader.
`dense` policy in float32 must reproduce it to float32 rounding: that pins the plumbing
(fused q|k|v and gate|up part order, llama's q/k un-permutation of quantized rows,
biases, tied heads built from token_embd, the row-wise embedding). The kernel policies
run in bf16 and must keep the greedy choice at (almost) every position.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import agreement_bound, auto_scheme
from modeldeploy.server.engine import block_kernel, quant, weights
from modeldeploy.server.engine.model import KVCache, ModelSpec, Transformer
from modeldeploy.server.formats import open_model

pytestmark = pytest.mark.skipif(
    not quant.cpu_kernels_available(), reason="torch build lacks the CPU int4/int8 kernels"
)


def load_pair(path, policy: str, dtype: torch.dtype):
    files = open_model(path)
    spec = ModelSpec.from_config(files.config, source=str(path))
    arch = str(files.gguf.metadata.get("general.architecture", spec.architecture))
    ref = Transformer(spec)
    ref.materialize(torch.device("cpu"), torch.float32)
    weights.load_gguf(ref, files.gguf, arch, str(path))
    qmodel = Transformer(dataclasses.replace(spec, tie_word_embeddings=False))
    report = quant.quantize_gguf_model(
        qmodel,
        files.gguf,
        dtype=dtype,
        policy=quant.QuantPolicy.parse(policy),
        permuted=arch in weights.GGUF_PERMUTED_ARCHS,
    )
    qmodel.materialize(torch.device("cpu"), dtype)
    # Norms and biases: the engine loader fills them; here copy them from the reference.
    missing, _ = qmodel.load_state_dict(ref.state_dict(), strict=False)
    assert not missing
    return ref.eval(), qmodel.eval(), spec, report


@torch.inference_mode()
def logits(model, spec, tokens: torch.Tensor, dtype) -> torch.Tensor:
    cache = KVCache(spec, 1, tokens.shape[1] + 1, dtype, torch.device("cpu"))
    return model(tokens, torch.arange(tokens.shape[1])[None], [0], cache)[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_dense_policy_reproduces_the_engine_loader(tiny_models, arch, qtype):
    ref, qm, spec, report = load_pair(tiny_models.gguf(arch, qtype), "dense", torch.float32)
    assert "token_embd.weight" in report.consumed
    assert all(s == ["dense"] for s in report.layers.values())
    tokens = torch.randint(0, spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        logits(qm, spec, tokens, torch.float32),
        logits(ref, spec, tokens, torch.float32),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize(
    ("qtype", "scheme"), [("Q4_0", auto_scheme("Q4_0")), ("Q8_0", auto_scheme("Q8_0"))]
)
def test_kernel_policy_keeps_greedy_choices(tiny_models, arch, qtype, scheme):
    ref, qm, spec, report = load_pair(tiny_models.gguf(arch, qtype), "auto", torch.bfloat16)
    wqkv = report.layers["layers.0.attn.wqkv"]
    assert wqkv == [scheme]
    tokens = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    got, want = logits(qm, spec, tokens, torch.bfloat16), logits(ref, spec, tokens, torch.float32)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= agreement_bound(scheme)
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


def load_cached(files, spec, ref, cache_dir):
    """The engine's bf16 kernel model with the conversion cache in `cache_dir`; norms and
    biases copied from the float reference."""
    model = Transformer(spec)
    report = quant.quantize_gguf_model(model, files.gguf, dtype=torch.bfloat16, cache_dir=cache_dir)
    model.materialize(torch.device("cpu"), torch.bfloat16)
    model.load_state_dict(ref.state_dict(), strict=False)
    return model.eval(), report


def test_conversion_cache_is_written_once_and_gives_the_same_model(tiny_models, tmp_path):
    path = tiny_models.gguf("qwen2", "Q4_0")
    files = open_model(path)
    spec = dataclasses.replace(ModelSpec.from_config(files.config), tie_word_embeddings=False)
    tokens = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    ref, _, _, _ = load_pair(path, "dense", torch.float32)
    pairs = [load_cached(files, spec, ref, tmp_path) for _ in range(2)]
    reports = [r for _, r in pairs]
    model = pairs[1][0]
    outs = [logits(m, spec, tokens, torch.bfloat16) for m, _ in pairs]
    assert [r.cache_hit for r in reports] == [False, True]
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert reports[0].layers == reports[1].layers
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # A cache hit reads its weights from the cache's file mapping until a server moves
    # them into memory (Engine.settle_weights): same values, other storage.
    assert not reports[0].mapped and reports[1].mapped
    # every layer moves, gate|up too (none of this file's layers is left for FBGEMM)
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert {id(seg) for m in layers for seg in m.segments} == {id(s) for s in reports[1].mapped}
    before = [seg.packed.data_ptr() for seg in reports[1].mapped if hasattr(seg, "packed")]
    quant.move_to_memory(reports[1].mapped)
    after = [seg.packed.data_ptr() for seg in reports[1].mapped if hasattr(seg, "packed")]
    assert before and all(a != b for a, b in zip(before, after, strict=True))
    torch.testing.assert_close(logits(model, spec, tokens, torch.bfloat16), outs[1], rtol=0, atol=0)


@pytest.mark.skipif(not quant.dynamic_int8_available(), reason="no FBGEMM dynamic linear")
def test_cached_rescored_head_moves_to_its_fast_pass_with_the_same_choices(
    tiny_models, tmp_path, monkeypatch
):
    """A rescored Q8_0 head (the tiny vocabulary let in) keeps its int8 rows in the
    conversion cache; after `settle` a cache hit's head runs FBGEMM and picks the
    same tokens as before, with the file's exact logits for them."""
    monkeypatch.setattr(quant, "RESCORE_MIN_VOCAB", 1)
    # the int4 coarse pass (a block-kernel pass keeps itself: the next test)
    monkeypatch.setattr(quant, "coarse_head_policy", lambda: quant.COARSE_HEAD_POLICY)
    path = tiny_models.gguf("qwen2", "Q8_0")
    files = open_model(path)
    spec = ModelSpec.from_config(files.config)  # tied: the head is token_embd's Q8_0 rows
    ref, _, _, _ = load_pair(path, "dense", torch.float32)
    tokens = torch.randint(0, spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    pairs = [load_cached(files, spec, ref, tmp_path) for _ in range(2)]
    reports = [r for _, r in pairs]
    models = [m for m, _ in pairs]
    assert reports[1].cache_hit and reports[0].layers["lm_head"] == ["int4+rescored"]
    head = models[1].lm_head
    assert reports[1].heads == [head] and head.fast is not None
    before = logits(models[1], spec, tokens, torch.bfloat16)
    quant.settle(reports[1].mapped, reports[1].heads)
    assert head.schemes == ["int8+rescored"]
    after = logits(models[1], spec, tokens, torch.bfloat16)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    top = before.topk(4, dim=-1)
    torch.testing.assert_close(after.gather(1, top.indices), top.values, rtol=0, atol=0)


@pytest.mark.skipif(not block_kernel.available(), reason=str(block_kernel.unavailable()))
def test_a_block_kernel_head_keeps_its_q5_0_pass(tiny_models, tmp_path, monkeypatch):
    """Where the head's coarse pass runs on the block kernel, no FBGEMM copy is built,
    cached or swapped in: it was slower up to eight rows and 45 % more bytes."""
    monkeypatch.setattr(quant, "RESCORE_MIN_VOCAB", 1)
    path = tiny_models.gguf("qwen2", "Q8_0")
    files = open_model(path)
    spec = ModelSpec.from_config(files.config)
    ref, _, _, _ = load_pair(path, "dense", torch.float32)
    pairs = [load_cached(files, spec, ref, tmp_path) for _ in range(2)]
    for model, report in pairs:
        assert report.layers["lm_head"] == ["q5_0+rescored"]
        assert report.heads == [] and model.lm_head.fast is None
    (cache,) = tmp_path.glob("*.pt")
    assert "fast" not in torch.load(cache, mmap=True, weights_only=True)["lm_head"]


@pytest.mark.skipif(not quant.dynamic_int8_available(), reason="no FBGEMM dynamic linear")
@pytest.mark.parametrize("policy", ["auto", "int8"])
def test_auto_rounds_activations_only_for_gate_up(tiny_models, policy, monkeypatch):
    """`auto` multiplies the int8 gate|up projections with 8-bit activations (FBGEMM) and
    every other int8 layer weight-only; `int8` keeps all weight-only. Either way, one
    token at a time (the decode path) keeps the float model's greedy choice. (Where the
    block kernel runs, Q8_0 layers are 7-bit blocks instead: not this test's subject.)"""
    monkeypatch.setattr(block_kernel, "unavailable", lambda: "off for this test")
    ref, qm, spec, _ = load_pair(tiny_models.gguf("qwen2", "Q8_0"), policy, torch.bfloat16)
    dynamic = {
        name
        for name, mod in qm.named_modules()
        if isinstance(mod, quant.QuantLinear)
        for seg in mod.segments
        if getattr(seg, "packed", None) is not None
    }
    want = {f"layers.{i}.mlp.w13" for i in range(spec.num_layers)} if policy == "auto" else set()
    assert dynamic == want
    tokens = torch.randint(0, spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    full = logits(ref, spec, tokens, torch.float32)
    cache = KVCache(spec, 1, 32, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        steps = torch.cat(
            [
                qm(tokens[:, i : i + 1], torch.tensor([[i]]), [0], cache)[0].float()
                for i in range(tokens.shape[1])
            ]
        )
    agree = (steps.argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
