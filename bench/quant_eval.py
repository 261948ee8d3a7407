"""Quality and speed of the GGUF weight policies on a real model, in-process (no HTTP).

For each policy the engine's Transformer is built with `quantize_gguf_model` and
compared against the float32 model dequantized from the same GGUF (the reference):
- logits over a teacher-forced text: max |diff|, mean KL(ref || policy), top-1 agreement;
- greedy continuations of a few prompts: tokens identical to the reference's, in a row;
- speed: prefill of 256 tokens and single-stream decode steps (median, min-max);
- bytes of the quantized layers and load (conversion) time.

    .venv/bin/python bench/quant_eval.py MODEL.gguf [--policies ref,dense,auto,int4]
        [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from modeldeploy.server.engine import quant, weights
from modeldeploy.server.engine.cpu import configure_threads
from modeldeploy.server.engine.device import kv_cache_dtype
from modeldeploy.server.engine.model import KVCache, ModelSpec, Transformer
from modeldeploy.server.formats import open_model

#: Caches as the engine makes them here (float32 K/V on CPU), so this measures serving.
CPU = torch.device("cpu")


TEXT = (
    "def quicksort(items):\n"
    '    """Sort a list with the quicksort algorithm and return a new list."""\n'
    "    if len(items) <= 1:\n        return items\n"
    "    pivot = items[len(items) // 2]\n"
    "    left = [x for x in items if x < pivot]\n"
    "    middle = [x for x in items if x == pivot]\n"
    "    right = [x for x in items if x > pivot]\n"
    "    return quicksort(left) + middle + quicksort(right)\n\n"
    "Kubernetes runs containers in pods; a Deployment keeps a number of identical pods "
    "running and replaces those that fail. A Service gives them one stable address. "
    "Les modèles de langage prédisent le prochain mot. 大型语言模型可以生成代码。"
)
PROMPTS = [
    "Write a Python function that checks whether a number is prime.\n",
    "The three laws of thermodynamics are",
    "<|im_start|>user\nExplain what a hash map is in two sentences.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "fn main() {\n    let v: Vec<i32> =",
]


def build(path: Path, policy: str, dtype: torch.dtype):
    """(model, spec, report, seconds): `ref`/`f32` = dense float32 via the engine loader."""
    files = open_model(path)
    spec = ModelSpec.from_config(files.config, source=str(path))
    gguf = files.gguf
    arch = str(gguf.metadata.get("general.architecture", spec.architecture))
    started = time.perf_counter()
    if policy == "ref":
        model = Transformer(spec)
        model.materialize(torch.device("cpu"), dtype)
        weights.load_gguf(model, gguf, arch, str(path))
        return model.eval(), spec, None, time.perf_counter() - started
    # The quantized lm_head replaces tying (see the integration recipe in STATUS.md).
    model = Transformer(dataclasses.replace(spec, tie_word_embeddings=False))
    report = quant.quantize_gguf_model(
        model,
        gguf,
        dtype=dtype,
        policy=quant.QuantPolicy.parse(policy),
        permuted=arch in weights.GGUF_PERMUTED_ARCHS,
    )
    quant.settle(report.mapped, report.heads)  # what a server runs once it is ready
    model.materialize(torch.device("cpu"), dtype)
    filler = weights.Filler(model, str(path))
    for info in gguf.tensors:
        if info.name in report.consumed:
            continue
        target = weights.gguf_target(info.name)
        if target is None:
            continue
        t = weights.gguf_tensor(gguf, info)
        if spec.norm_unit_offset and info.name.endswith("norm.weight"):
            t = t.float() - 1.0
        filler.put(target, t, info.name)
    filler.finish()
    return model.eval(), spec, report, time.perf_counter() - started


@torch.inference_mode()
def logits_for(model, spec, ids: list[int], dtype) -> torch.Tensor:
    cache = KVCache(spec, 1, len(ids) + 1, kv_cache_dtype(CPU, dtype), CPU)
    tokens = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    return model(tokens, pos, [0], cache)[0]


@torch.inference_mode()
def greedy(model, spec, ids: list[int], n: int, dtype) -> tuple[list[int], list[float]]:
    """n greedy tokens and the seconds of each single-token decode step."""
    cache = KVCache(spec, 1, len(ids) + n + 1, kv_cache_dtype(CPU, dtype), CPU)
    logits = model(
        torch.tensor([ids]), torch.arange(len(ids))[None], [0], cache, torch.tensor([len(ids) - 1])
    )
    out, steps = [], []
    for i in range(n):
        tok = int(logits[0].argmax())
        out.append(tok)
        t0 = time.perf_counter()
        logits = model(
            torch.tensor([[tok]]), torch.tensor([[len(ids) + i]]), [0], cache, torch.tensor([0])
        )
        steps.append(time.perf_counter() - t0)
    return out, steps


@torch.inference_mode()
def prefill_seconds(model, spec, n: int, dtype, reps: int = 3) -> list[float]:
    ids = torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps):
        cache = KVCache(spec, 1, n + 1, kv_cache_dtype(CPU, dtype), CPU)
        t0 = time.perf_counter()
        model(ids, torch.arange(n)[None], [0], cache, torch.tensor([n - 1]))
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--policies", default="auto,int4,dense")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--ref-cache", type=Path, default=Path(__file__).parent / ".work" / "ref")
    args = ap.parse_args(argv)
    threads = configure_threads(args.threads)
    from modeldeploy.server.engine.tokenizer import Tokenizer

    files = open_model(args.model)
    tok = Tokenizer.from_files(None, files.gguf.metadata)
    text_ids = tok.encode(TEXT)
    prompt_ids = [tok.encode(p) for p in PROMPTS]

    # The float32 reference is slow on a busy 2-core machine: computed once, then cached.
    ref_file = args.ref_cache / f"{args.model.stem}-{len(text_ids)}-{args.new_tokens}.pt"
    if ref_file.exists():
        ref_logits, ref_greedy = torch.load(ref_file)
    else:
        ref_model, spec, _, _ = build(args.model, "ref", torch.float32)
        ref_logits = logits_for(ref_model, spec, text_ids, torch.float32)
        ref_greedy = [
            greedy(ref_model, spec, p, args.new_tokens, torch.float32)[0] for p in prompt_ids
        ]
        del ref_model
        gc.collect()
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save((ref_logits, ref_greedy), ref_file)

    results = {
        "model": str(args.model),
        "threads": threads,
        "text_tokens": len(text_ids),
        "policies": {},
    }
    for policy in args.policies.split(","):
        dtype = torch.float32 if policy == "ref" else torch.bfloat16
        model, spec, report, load_s = build(args.model, policy, dtype)
        lg = logits_for(model, spec, text_ids, dtype).float()
        lp_ref, lp = ref_logits.log_softmax(-1), lg.log_softmax(-1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        top1 = (lg.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        same_prefix, steps = [], []
        for p, ref_out in zip(prompt_ids, ref_greedy, strict=True):
            out, st = greedy(model, spec, p, args.new_tokens, dtype)
            steps += st[2:]
            n = next(
                (i for i, (a, b) in enumerate(zip(out, ref_out, strict=True)) if a != b), len(out)
            )
            same_prefix.append(n)
        pre = prefill_seconds(model, spec, args.prefill, dtype)
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "max_abs_logit_diff": round((lg - ref_logits).abs().max().item(), 4),
            "mean_kl": round(kl.mean().item(), 5),
            "top1_agreement": round(top1, 4),
            "greedy_identical_prefix": same_prefix,
            "decode_tok_s_median": round(1 / statistics.median(steps), 2),
            "decode_ms_min_max": [round(min(steps) * 1e3, 1), round(max(steps) * 1e3, 1)],
            "prefill_tok_s_median": round(args.prefill / statistics.median(pre), 1),
            "build_s": round(load_s, 2),
            "quantized": report.summary() if report else None,
        }
        results["policies"][policy] = row
        if args.json:  # written after each policy: a slow run still leaves what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(policy, json.dumps(row), flush=True)
        del model
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
