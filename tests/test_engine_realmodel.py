"""Real models from the catalogue: our first 16 greedy tokens equal transformers' on the same GGUF.

Both sides dequantize the same GGUF (gguf-py / our torch decoders, bit-identical) and run in
float32, so the token streams must match exactly. transformers needs ~40 s (up to 10 min on a
busy machine) to load each GGUF, so each oracle is loaded once and asked two short prompts.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect, hf_greedy, one_torch_thread, run
from modeldeploy.server.engine.engine import Engine

transformers = pytest.importorskip("transformers")

PROMPTS = ["def fibonacci(n):", "The capital of France is"]
GREEDY = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


def _compare(path, prompts: list[str]) -> None:
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=2, max_model_len=256)
    try:
        ours = {
            p: run(collect(engine, p, temperature=0.0, max_tokens=16, ignore_eos=True))
            for p in prompts
        }
        ids = {p: engine.encode(p) for p in prompts}
    finally:
        engine.close()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    for p in prompts:
        assert ours[p].token_ids == hf_greedy(hf, ids[p], 16), p


@pytest.mark.timeout(1500)
def test_qwen_gguf_greedy_matches_transformers(qwen_gguf) -> None:
    _compare(qwen_gguf, PROMPTS)


@pytest.mark.timeout(1500)
def test_gemma_gguf_greedy_matches_transformers(gemma_gguf) -> None:
    _compare(gemma_gguf, PROMPTS)
