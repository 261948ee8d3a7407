"""Engine.load with quantized GGUF weights on CPU (quant.py's int4/int8 kernels).

The reference is the same GGUF loaded by the engine densely in float32 (itself pinned to
transformers by test_engine_oracle). The kernel path computes in bfloat16 with int8
requantized Q8_0 or exact-int4 Q4_0 weights, so it must keep the greedy choice at >= 90%
of prompt positions and stay within 10% of the largest logit (the bound test_quant_model
uses for the bare layers), and it must say in /model what it did.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    agreement_bound,
    auto_scheme,
    collect,
    one_torch_thread,
    prompt_logits,
    run,
)
from modeldeploy.server.engine import quant
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.errors import UserInputError

PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b"

needs_kernels = pytest.mark.skipif(
    not quant.cpu_kernels_available(), reason="torch build lacks the CPU int4/int8 kernels"
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


@pytest.fixture(autouse=True)
def _no_policy_env(monkeypatch):
    monkeypatch.delenv(quant.POLICY_ENV, raising=False)
    monkeypatch.setenv(quant.CACHE_ENV, "0")  # no conversion cache under the user's home


def load(path, dtype: str, **kw) -> Engine:
    return Engine.load(path, dtype=dtype, device="cpu", max_concurrent=2, max_model_len=128, **kw)


def logits_of(engine: Engine, ids: list[int]) -> torch.Tensor:
    try:
        return prompt_logits(engine, ids).float()
    finally:
        engine.close()


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize(
    ("qtype", "scheme"), [("Q4_0", auto_scheme("Q4_0")), ("Q8_0", auto_scheme("Q8_0"))]
)
def test_auto_policy_quantizes_bf16_gguf_within_bound(tiny_models, arch, qtype, scheme):
    path = tiny_models.gguf(arch, qtype)
    dense = load(path, "float32")
    dense_info = dense.info()
    ids = dense.encode(PROMPT)
    want = logits_of(dense, ids)
    eng = load(path, "bfloat16")
    info = eng.info()
    got = logits_of(eng, ids)
    assert dense_info["weights"]["quantized"] is False
    w = info["weights"]
    assert w["policy"] == "auto" and w["quantized"] is True
    assert w["segments"].get(scheme, 0) > 0
    assert info["memory"]["weights_bytes"] >= w["quantized_bytes"] > 0
    tied = vocab_x_hidden = 0
    if eng.spec.tie_word_embeddings:  # the dense model shares one tensor, quant holds two
        tied, vocab_x_hidden = 1, eng.spec.vocab_size * eng.spec.hidden_size
    assert info["parameters"] == dense_info["parameters"] + tied * vocab_x_hidden
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= agreement_bound(scheme), f"greedy agreement {agree:.2f} at {len(ids)} positions"
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


@needs_kernels
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])  # int4 layers; int8 with FBGEMM gate|up
def test_quantized_engine_generates_batched(tiny_models, qtype):
    """Two concurrent greedy streams through the scheduler equal the same requests alone."""
    eng = load(tiny_models.gguf("qwen2", qtype), "bfloat16")
    try:

        async def both():
            import asyncio

            return await asyncio.gather(
                collect(eng, "def add(a, b):", temperature=0.0, max_tokens=8, ignore_eos=True),
                collect(eng, "The quick brown", temperature=0.0, max_tokens=8, ignore_eos=True),
            )

        a, b = run(both())
        alone = run(collect(eng, "def add(a, b):", temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        eng.close()
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.token_ids) == len(b.token_ids) == 8
    assert a.token_ids == alone.token_ids


@pytest.mark.parametrize(
    ("dtype", "policy", "reason"),
    [("float32", None, "float32"), ("bfloat16", "dense", "policy dense")],
)
def test_dense_when_float32_or_policy_dense(tiny_models, dtype, policy, reason):
    eng = load(tiny_models.gguf("qwen2", "Q8_0"), dtype, quant_policy=policy)
    try:
        w = eng.info()["weights"]
    finally:
        eng.close()
    assert w["quantized"] is False and reason in w["reason"]


@needs_kernels
def test_policy_from_environment(tiny_models, monkeypatch):
    """An explicit int8 policy applies even in float32 (the kernels cast to bf16)."""
    monkeypatch.setenv(quant.POLICY_ENV, "INT8")
    eng = load(tiny_models.gguf("qwen2", "Q4_0"), "float32")
    try:
        w = eng.info()["weights"]
    finally:
        eng.close()
    assert w["policy"] == "int8" and w["quantized"] is True
    assert w["segments"].get("int4", 0) > 0  # Q4_0 stays exact int4 under every kernel policy


def test_safetensors_stay_dense(tiny_models):
    eng = load(tiny_models.hf("qwen2"), "bfloat16")
    try:
        w = eng.info()["weights"]
    finally:
        eng.close()
    assert w["quantized"] is False and "SafeTensors" in w["reason"]


def test_unknown_policy_is_user_error(tiny_models):
    with pytest.raises(UserInputError, match="quant policy 'fp3'"):
        load(tiny_models.gguf("qwen2", "Q4_0"), "bfloat16", quant_policy="fp3")


@needs_kernels
def test_conversion_cache_serves_the_second_load(tiny_models, tmp_path, monkeypatch):
    """The converted layers are written once and memory-mapped on the next load."""
    monkeypatch.setenv(quant.CACHE_ENV, str(tmp_path))
    path = tiny_models.gguf("llama", "Q8_0")
    runs = []
    for _ in range(2):
        eng = load(path, "bfloat16")
        try:
            ids = eng.encode(PROMPT)
            runs.append((eng.info()["weights"]["cache_hit"], logits_of(eng, ids)))
        finally:
            eng.close()
    assert [hit for hit, _ in runs] == [False, True]
    assert len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
