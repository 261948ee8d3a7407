"""The decode step through torch.compile (`compiled.compile_decode`), as a server runs it
once ready: same tokens as eager decode, no compiling while requests run, and a clear
reason where it cannot compile."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import collect, one_torch_thread, run, wait_settled
from modeldeploy.server.engine import compiled, quant
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.engine.model import KVCache

PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello, world! How are you today?"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


def greedy_runs(engine: Engine) -> list[list[int]]:
    """Three prompts at once (rows at different positions), then the first alone."""

    async def go() -> list[list[int]]:
        together = await asyncio.gather(
            *(collect(engine, p, temperature=0.0, max_tokens=12, ignore_eos=True) for p in PROMPTS)
        )
        alone = await collect(engine, PROMPTS[0], temperature=0.0, max_tokens=12, ignore_eos=True)
        return [r.token_ids for r in together] + [alone.token_ids]

    return run(go())


def decode_logits(engine: Engine, ids: list[int], prefix: int) -> torch.Tensor:
    """Teacher-forced: prefill `ids[:prefix]`, then decode the rest one token a step in a
    private cache; the logits (steps, V) of every decode step."""
    model = engine.model
    cache = KVCache(engine.spec, 2, len(ids) + 1, engine.kv_dtype, engine.placement.device)
    out = []
    with torch.inference_mode():
        model(torch.tensor([ids[:prefix]]), torch.arange(prefix)[None], [1], cache)
        for p in range(prefix, len(ids)):
            out.append(model(torch.tensor([[ids[p]]]), torch.tensor([[p]]), [1], cache)[0, -1])
    return torch.stack(out).float()


@pytest.mark.skipif(
    not quant.cpu_kernels_available(), reason="torch build lacks the CPU int4/int8 kernels"
)
def test_compiled_decode_matches_eager_and_never_compiles_mid_serving(tiny_models):
    """A quantized model (int8 gate|up through FBGEMM's custom op where torch has it),
    compiled the way a server does once ready:
    - every decode variant the scheduler produces (one row; three rows at different
      positions) runs a graph compiled beforehand: torch is told to fail rather than
      compile, and nothing fails;
    - a prompt decodes to the same tokens alone as among others;
    - decode logits agree with eager decode's (the fused kernels round bf16 elsewhere)."""
    path = tiny_models.gguf("qwen2", "Q8_0")
    engine = Engine.load(path, dtype="bfloat16", device="cpu", max_concurrent=4, max_model_len=96)
    try:
        reason = compiled.unavailable(engine.model, engine.placement.device)
        if reason is not None:
            pytest.skip(reason)
        ids = engine.encode(" ".join(PROMPTS))[:40]
        eager = decode_logits(engine, ids, 8)
        engine.settle_weights(compile_decode=True)  # what a server does once ready
        assert engine.weights_info["settled"] is False
        wait_settled(engine)
        assert engine.weights_info["decode_step"].startswith("compiled in")
        blocks = engine.model.decode_blocks
        assert blocks is not None
        torch.compiler.set_stance("fail_on_recompile")
        try:
            runs = greedy_runs(engine)
            got = decode_logits(engine, ids, 8)
        finally:
            torch.compiler.set_stance("eager_on_recompile")
        assert blocks.fallbacks == 0  # every block ran a compiled graph by our dispatch
        assert runs[0] == runs[3]
        agree = (got.argmax(-1) == eager.argmax(-1)).float().mean()

        assert agree >= 0.9
        assert (got - eager).abs().max() <= 0.05 * eager.abs().max()
    finally:
        engine.model.decode_blocks = None
        engine.close()


@pytest.mark.skipif(
    not quant.cpu_kernels_available(), reason="torch build lacks the CPU int4/int8 kernels"
)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_a_variant_no_graph_was_compiled_for_runs_eagerly(tiny_models):
    """Input no compiled graph accepts (float32 activations: the graphs take bf16) goes
    through torch.compile's own path, which runs it eagerly: the eager blocks' bits."""
    engine = Engine.load(
        tiny_models.gguf("qwen2", "Q8_0"),
        dtype="bfloat16",
        device="cpu",
        max_concurrent=2,
        max_model_len=64,
    )
    try:
        if compiled.unavailable(engine.model, engine.placement.device) is not None:
            pytest.skip("no compiler")
        model = engine.model
        outcome = compiled.compile_decode(model, engine.kv_dtype, engine.placement.device)
        assert outcome.startswith("compiled in")
        blocks = model.decode_blocks
        cache = KVCache(engine.spec, 2, 16, engine.kv_dtype, engine.placement.device)
        cache.prepare([0, 1], 16)
        with torch.inference_mode():
            step = model.step_for(torch.tensor([[5], [9]]), [0, 1], torch.float32)
            x = torch.randn(2, 1, engine.spec.hidden_size)
            want = x
            for i, layer in enumerate(model.layers):
                want = layer(want, step, cache.k[i], cache.v[i])
            got = blocks(x, step, cache)
        assert blocks.fallbacks == len(model.layers)
        assert torch.equal(got, want)
    finally:
        engine.model.decode_blocks = None
        engine.close()


def test_without_a_compiler_decode_stays_eager_and_says_why(tiny_models, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    engine = Engine.load(tiny_models.gguf("qwen2", "Q8_0"), device="cpu", max_model_len=64)
    try:
        outcome = compiled.compile_decode(engine.model, engine.kv_dtype, engine.placement.device)
        assert outcome == "eager: no C++ compiler (/nonexistent/g++) for torch.compile"
        assert engine.model.decode_blocks is None
    finally:
        engine.close()
