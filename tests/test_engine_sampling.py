"""Sampling filters against a plain whole-vocabulary reference, and stop-string holding."""

from __future__ import annotations

import pytest
import torch
from modeldeploy.server.engine.sampling import (
    TOP_P_CANDIDATES,
    RequestSampler,
    SamplingParams,
    candidates,
    sample_batch,
)
from modeldeploy.server.engine.stop_strings import StopStringFilter


def reference(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The textbook pipeline over the full vocabulary: temperature, top-k, top-p, min-p."""
    logits = row / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def dense(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    idx, probs = candidates(row, p)
    out = torch.zeros_like(row)
    if idx is None:
        out = probs.clone()
    else:
        out[idx] = probs
    return out / out.sum()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 50},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 1.3, "top_p": 0.5, "top_k": 200},
        {"temperature": 1.0, "min_p": 0.1},
        {"temperature": 0.9, "top_p": 0.95, "min_p": 0.02},
    ],
)
@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["peaked", "flat"])
def test_candidates_equal_full_vocabulary_reference(params: dict, scale: float) -> None:
    """'flat' puts the top-p nucleus beyond the first candidates: the fallback path."""
    torch.manual_seed(0)
    row = torch.randn(20 * TOP_P_CANDIDATES) * scale
    p = SamplingParams(**params)
    assert torch.allclose(dense(row, p), reference(row, p), atol=1e-6)


def test_stop_filter_holds_back_possible_prefixes() -> None:
    f = StopStringFilter(["</answer>", "STOP"])
    assert f.push("The result is 4") == "The result is 4"
    assert f.push(" </ans") == " "  # might be the start of a stop string: held
    assert f.push("wer> trailing") == ""  # it was: nothing of it (or after it) is sent
    assert f.matched == "</answer>"
    g = StopStringFilter(["STOP"])
    assert g.push("ST") == ""
    assert g.push("ART") == "START"  # not a stop after all: released
    assert g.push("S") == ""
    assert g.flush() == "S"  # the stream ended: held text is real output


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_tiny_temperature_samples_greedily(temperature: float) -> None:
    """A positive but tiny temperature must not divide logits to inf (NaN softmax)."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(3)) * 20
    params = SamplingParams(temperature=temperature, seed=1)
    params.validate()
    samplers = [RequestSampler(params, [1, 2], torch.device("cpu")) for _ in range(2)]
    got = [c.token_id for c in sample_batch(logits, samplers)]
    assert got == logits.argmax(-1).tolist()


def test_tiny_repetition_penalty_stays_finite() -> None:
    """repetition_penalty=1e-300 favours the seen tokens without making their logits inf."""
    logits = torch.full((1, 50), -1.0)
    logits[0, 7] = 5.0  # seen and positive: divided by the penalty
    logits[0, 9] = 4.0  # seen and positive
    params = SamplingParams(temperature=0.7, repetition_penalty=1e-300, seed=0)
    params.validate()
    sampler = RequestSampler(params, [7, 9], torch.device("cpu"))
    row = sampler.penalize(logits[0].clone())
    assert torch.isfinite(row).all()
    choices = [sample_batch(logits, [sampler])[0].token_id for _ in range(5)]
    assert set(choices) <= {7, 9}
