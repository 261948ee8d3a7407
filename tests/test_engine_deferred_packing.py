"""A server's load leaves FBGEMM's packing of the int8 gate|up layers until after ready
(`Engine.load(defer_packing=True)`, `Engine.settle_weights`): it serves before the
packing, including across the swap, and computes afterwards what a load that packed at
once computes."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import collect, one_torch_thread, run, wait_settled
from modeldeploy.server.engine import block_kernel, quant
from modeldeploy.server.engine.engine import Engine

PROMPTS = ["The quick brown fox", "def add(a, b):"]

pytestmark = pytest.mark.skipif(
    not (quant.cpu_kernels_available() and quant.dynamic_int8_available()),
    reason="torch build lacks the CPU int8 kernels or FBGEMM",
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


def greedy(engine: Engine, max_tokens: int = 12) -> list[list[int]]:
    async def go() -> list[list[int]]:
        rs = [
            await collect(engine, p, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            for p in PROMPTS
        ]
        return [r.token_ids for r in rs]

    return run(go())


def test_deferred_packing_serves_before_during_and_after_the_swap(tiny_models, monkeypatch):
    # where the block kernel runs, Q8_0 layers are its 7-bit blocks and nothing is packed
    monkeypatch.setattr(block_kernel, "unavailable", lambda: "off: FBGEMM's layers tested")
    path = tiny_models.gguf("qwen2", "Q8_0")
    kwargs = dict(dtype="bfloat16", device="cpu", max_concurrent=2, max_model_len=96)
    packed_at_load = Engine.load(path, **kwargs)
    try:
        reference = greedy(packed_at_load)
    finally:
        packed_at_load.close()

    engine = Engine.load(path, defer_packing=True, **kwargs)
    try:
        waiting = list(engine.quant_report.packs)
        assert waiting, "gate|up should be left to pack"
        assert all(seg.packed is None and seg.weight is not None for seg in waiting)
        before = greedy(engine)
        assert [len(ids) for ids in before] == [12, 12]

        async def across_the_swap() -> list[int]:
            # a request decoding while the background thread packs and drops the weights
            task = asyncio.ensure_future(
                collect(engine, PROMPTS[0], temperature=0.0, max_tokens=48, ignore_eos=True)
            )
            await asyncio.sleep(0)
            engine.settle_weights()
            return (await task).token_ids

        assert len(run(across_the_swap())) == 48
        wait_settled(engine)
        assert all(seg.packed is not None and seg.weight is None for seg in waiting)
        assert greedy(engine) == reference
    finally:
        engine.close()
