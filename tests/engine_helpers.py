"""Helpers shared by the engine tests: run a stream to completion, HF greedy oracle."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
import torch
from gguf import GGMLQuantizationType
from modeldeploy.server.engine.engine import Engine, GenerationEvent
from modeldeploy.server.engine.quant import QuantPolicy
from modeldeploy.server.engine.sampling import SamplingParams


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    events: list[GenerationEvent]


async def collect(engine: Engine, prompt, **params) -> Result:
    """Run one request to its end and gather its tokens, text and final event."""
    events = [ev async for ev in engine.generate(prompt, SamplingParams(**params), "test")]
    return Result(
        [t for ev in events for t in ev.token_ids],
        "".join(ev.text for ev in events),
        events[-1].finish_reason,
        events,
    )


def run(coro):
    return asyncio.run(coro)


def wait_settled(engine: Engine, timeout: float = 600) -> None:
    """Wait for `Engine.settle_weights`'s background work (GET /model's `weights.settled`)."""
    deadline = time.monotonic() + timeout
    while not engine.weights_info.get("settled") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.weights_info.get("settled"), engine.weights_info


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model by explicit argmax (no generation config)."""
    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(hf_model(x).logits[0, -1].argmax())
            out.append(tok)
            x = torch.cat([x, torch.tensor([[tok]])], dim=1)
    return out


def prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Our logits (T, V) for a whole prompt in one forward, in a private KV cache."""
    from modeldeploy.server.engine.model import KVCache

    cache = KVCache(engine.spec, 1, len(ids), engine.placement.dtype, engine.placement.device)
    with torch.inference_mode():
        return engine.model(torch.tensor([ids]), torch.arange(len(ids))[None], [0], cache)[0]


def one_torch_thread():
    """Generator for a module fixture: one torch thread for tiny-model tests. On a shared,
    overloaded CPU a two-thread OpenMP team waits at every barrier for a descheduled peer
    (35x slower steps measured here); the engine reads MODELDEPLOY_THREADS at load."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELDEPLOY_THREADS", "1")
        yield


def auto_scheme(qtype: str) -> str:
    """What `auto` holds a GGUF type as on this CPU: the block kernel's records where it
    runs (Q5_0, 4-bit or 7-bit blocks), else torch's int4/int8 kernels."""
    return QuantPolicy().scheme_for(GGMLQuantizationType[qtype]).value


def agreement_bound(scheme: str) -> float:
    """Greedy agreement with the float model a tiny random model must keep. The block
    kernel also rounds activations (int8 per block of 32): on these random weights, whose
    top logits nearly tie, that flips 3-4 of 32-43 positions (0.86-0.88). The real model's
    bound is measured in bench/QUANT.md (top-1 99.35 %)."""
    return 0.8 if scheme in ("q4", "q5_0", "q7") else 0.9
