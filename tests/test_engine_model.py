"""The decoder's batching contract: slots, positions and masks, independent of the scheduler."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import one_torch_thread, prompt_logits
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.engine.model import KVCache


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def engine(request, tiny_models):
    eng = Engine.load(
        tiny_models.hf(request.param), dtype="float32", device="cpu", max_concurrent=1
    )
    yield eng
    eng.close()


def _prefill(engine, cache, slot: int, ids: list[int], chunk: int) -> torch.Tensor:
    """Feed `ids` into `slot` in chunks; return the last token's logits."""
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        logits = engine.model(
            torch.tensor([part]),
            torch.arange(start, start + len(part))[None],
            [slot],
            cache,
            torch.tensor([len(part) - 1]),
        )
    return logits[0]


def test_batched_decode_in_scattered_slots_equals_each_alone(engine) -> None:
    prompts = [
        engine.encode("The quick brown fox jumps over the lazy dog and runs away"),
        engine.encode("def add(a, b):"),
        engine.encode("Numbers: 1 2 3"),
    ]
    slots = [3, 0, 2]  # neither contiguous nor sorted: the gather path
    with torch.inference_mode():
        cache = KVCache(engine.spec, 4, 64, torch.float32, "cpu")
        for t in (*cache.k, *cache.v):  # what uninitialised memory may hold
            t.fill_(float("nan"))
        cache.clean = [0] * 4  # as a cache zeroed lazily, by writing (a GPU's), finds it
        # a stale occupant in slots 3 and 0 (never visible); slot 2 holds only NaN beyond its
        # short prompt, inside the range the longer rows make the batch attend over
        for s in (3, 0):
            _prefill(engine, cache, s, engine.encode("stale stale stale " * 4), 64)
        for s, ids in zip(slots, prompts, strict=True):
            _prefill(engine, cache, s, ids, chunk=3)  # chunked prefill
        nxt = [1, 2, 3]
        batched = engine.model(
            torch.tensor([[t] for t in nxt]),
            torch.tensor([[len(ids)] for ids in prompts]),
            slots,
            cache,
            torch.zeros(3, dtype=torch.long),
        )
    for row, (ids, t) in enumerate(zip(prompts, nxt, strict=True)):
        alone = prompt_logits(engine, [*ids, t])[-1]
        assert (batched[row] - alone).abs().max().item() < 1e-4


def test_chunked_prefill_equals_one_forward(engine) -> None:
    ids = engine.encode("Kubernetes runs containers; the operator reconciles a ModelDeployment.")
    assert len(ids) > 16  # crosses gemma3's tiny sliding window
    whole = prompt_logits(engine, ids)[-1]
    with torch.inference_mode():
        cache = KVCache(engine.spec, 1, 64, torch.float32, "cpu")
        chunked = _prefill(engine, cache, 0, ids, chunk=5)
    assert (whole - chunked).abs().max().item() < 1e-4
