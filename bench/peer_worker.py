"""One in-process peer (llama-cpp-python or HF transformers), driven over stdin/stdout.

bench/bench.py starts this with the peer's own interpreter (bench/.work/venv for
llama-cpp-python, the product venv's test extra for transformers), so each peer runs in
its own process with its own peak RSS, loaded once, and the benchmark can interleave
trials A B A B. Protocol: one JSON command per line in, one JSON result per line out.

    {"op": "load", "model": PATH, "threads": N, "ctx": 4096}      -> {"load_s": s}
    {"op": "prompt", "text": T}               -> {"prompt_tokens": n, "seconds": s}
    {"op": "decode", "text": T, "tokens": n}  -> {"tokens": n, "seconds": s} (after the 1st)
    {"op": "rss"}                             -> {"peak_rss_bytes": b}
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


class LlamaCpp:
    """llama.cpp through llama-cpp-python: eval() for prompts, generate() for decode."""

    def __init__(self, model: str, threads: int, ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model,
            n_ctx=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )

    def prompt(self, text: str) -> dict:
        ids = self.llm.tokenize(text.encode(), add_bos=True, special=True)
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return {"prompt_tokens": len(ids), "seconds": time.perf_counter() - t0}

    def decode(self, text: str, tokens: int) -> dict:
        ids = self.llm.tokenize(text.encode(), add_bos=True, special=True)
        n, t_first = 0, 0.0
        # generate() never stops at EOS by itself: exactly `tokens` tokens, greedy.
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n == tokens:
                break
        return {"tokens": n - 1, "seconds": time.perf_counter() - t_first}


class Transformers:
    """HF transformers, eager attention, loading the same GGUF (dequantized by transformers)."""

    def __init__(self, model: str, threads: int, ctx: int, dtype: str = "bfloat16") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        path = Path(model)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=getattr(torch, dtype),
            attn_implementation="eager",
        ).eval()

    def prompt(self, text: str) -> dict:
        ids = self.tok(text, return_tensors="pt").input_ids
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(ids, use_cache=True)
            return {"prompt_tokens": ids.shape[1], "seconds": time.perf_counter() - t0}

    def decode(self, text: str, tokens: int) -> dict:
        ids = self.tok(text, return_tensors="pt").input_ids
        with self.torch.inference_mode():
            out = self.model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(tokens - 1):
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return {"tokens": tokens - 1, "seconds": time.perf_counter() - t0}


PEERS = {"llama-cpp-python": LlamaCpp, "transformers": Transformers}


def main() -> int:
    kind = sys.argv[1]
    peer = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "load":
                t0 = time.perf_counter()
                peer = PEERS[kind](**cmd)
                result = {"load_s": time.perf_counter() - t0}
            elif op == "prompt":
                result = peer.prompt(cmd["text"])
            elif op == "decode":
                result = peer.decode(cmd["text"], cmd["tokens"])
            elif op == "rss":
                result = {
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                }
            else:
                result = {"error": f"unknown op {op}"}
        except Exception as exc:  # reported to the driver, which records the failure
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
