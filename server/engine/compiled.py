"""Decode steps through torch.compile, built on a background thread once a server is ready.

Why: a single-stream decode step of Qwen2.5-0.5B runs ~1700 aten ops. The weight
kernels take ~19 ms of its ~29 ms; the rest is per-op dispatch of a few microseconds
each (norms, rotary, residuals, dtype casts, the FBGEMM input mapping). Inductor fuses
the work between the kernels into a few C++ loops per block, measured at 28.6 -> 24.8
ms a step for one stream and 56.6 -> 50.6 ms for eight (bench/QUANT.md).

Why after ready: compiling costs ~15 s of CPU cold and ~4 s from Inductor's on-disk
cache, far beyond the start-up budget. Until it is done decode runs eagerly; nothing
waits for it, and a failure only leaves decode eager (the reason is in GET /model).

Why only decode: prompt chunks spend their time in GEMMs, and every chunk length
would need a graph of its own.

No stall mid-serving: each decode variant the scheduler produces (one row or many,
contiguous or scattered slots, masked or not) is compiled first on a small scratch
cache, then torch is told to run any variant it has not seen eagerly instead of
compiling it while requests wait (`set_stance("eager_on_recompile")`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch
from modeldeploy.server.contract import cache_root
from modeldeploy.server.engine import quant
from modeldeploy.server.engine.model import KVCache, Transformer

log = logging.getLogger("modeldeploy.engine")

#: Inductor's cache of compiled kernels. Unless set, it goes beside the conversion
#: cache (on a pod: the models volume), so a restart compiles warm.
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
#: Scratch slots and rows for compiling. torch specializes sizes 0 and 1, so the
#: general graph is traced with 3 rows, and 5 slots keep the scratch cache unlike any
#: other size (a coincidence would be baked into the graph).
SCRATCH_SLOTS = 5
ROWS = 3
#: Position of the scratch rows: past the sizes torch specializes, small to keep the
#: scratch cache small.
POSITION = 20


def unavailable(model: Transformer, device: torch.device) -> str | None:
    """Why decode cannot be compiled here, or None."""
    if device.type != "cpu":
        return f"torch.compile is used on CPU only; {device} runs eagerly"
    if model.spec.num_experts:
        return "mixture-of-experts routing depends on the data; it runs eagerly"
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for torch.compile"
    return None


def compile_decode(model: Transformer, kv_dtype: torch.dtype, device: torch.device) -> str:
    """Compile the blocks' decode forwards, install them, and say what decode runs as.

    Returns "compiled in N s" or "eager: <reason>"; never raises for a compiler
    problem, since eager decode is always there to fall back on.
    """
    reason = unavailable(model, device)
    if reason is not None:
        return f"eager: {reason}"
    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(cache_root() / "inductor"))
    started = time.monotonic()
    try:
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        quant.define_fbgemm_op()
        # One graph per block variant (int4/int8 down projection, masks, slot layout):
        # beyond torch's default 8 a variant would silently run eagerly.
        torch._dynamo.config.recompile_limit = 64
        compiled = [
            torch.compile(layer.forward, dynamic=True, fullgraph=True) for layer in model.layers
        ]
        # Without duck sizing a row count equal to some other size (2 KV heads) is not
        # assumed equal to it in the graph.
        steps = scratch_steps(model)
        # Made outside inference mode like the serving cache: the graphs check that too.
        length = max(p for positions, _ in steps for (p,) in positions) + 2
        cache = KVCache(model.spec, SCRATCH_SLOTS, length, kv_dtype, device)
        cache.prepare(list(range(SCRATCH_SLOTS)), length)
        with fx_config.patch(use_duck_shape=False), torch.inference_mode():
            for positions, slots in steps:
                _run(model, compiled, cache, positions, slots)
    except Exception as exc:  # any compiler failure leaves decode eager
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("decode stays eager: torch.compile failed: %s", first[:300])
        return f"eager: torch.compile failed: {first[:200]}"
    torch.compiler.set_stance("eager_on_recompile")
    model.decode_layers = compiled
    secs = time.monotonic() - started
    log.info("decode step compiled in %.1fs", secs)
    return f"compiled in {secs:.1f} s"


def scratch_steps(model: Transformer) -> list[tuple[list[list[int]], list[int]]]:
    """(positions, slots) of the decode variants the scheduler produces.

    One row; several rows in contiguous slots (a slice of the cache) or scattered ones
    (a gather); all at the same position (no mask) or not. A model with sliding-window
    layers also gets rows past the window, where only those layers mask.
    """
    p = POSITION
    steps = [
        ([[p]], [2]),
        ([[p]] * ROWS, [0, 1, 2]),
        ([[p], [p + 1], [p + 2]], [0, 1, 2]),
        ([[p]] * ROWS, [4, 0, 2]),
        ([[p], [p + 1], [p + 2]], [4, 0, 2]),
    ]
    window = model.spec.sliding_window
    if any(model.spec.layer_sliding) and window:
        far = window + POSITION
        steps += [([[far]], [2]), ([[far]] * ROWS, [0, 1, 2]), ([[far]] * ROWS, [4, 0, 2])]
    return steps


def _run(
    model: Transformer, layers: list, cache: KVCache, positions: list[list[int]], slots: list[int]
) -> None:
    """One decode step through `layers` on the scratch cache (never the serving one)."""
    device = cache.k[0].device
    pos = torch.tensor(positions, device=device)
    dtype = model.norm.weight.dtype
    x = torch.randn(len(slots), 1, model.spec.hidden_size, device=device).to(dtype)
    step = model.step_for(pos, slots, dtype)
    for i, layer in enumerate(layers):
        x = layer(x, step, cache.k[i], cache.v[i])
