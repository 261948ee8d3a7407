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

Once compiled, a step does not call the 24 torch.compile wrappers: `DecodeBlocks` checks
dynamo's guards once per kind of block and step and runs the graph's code itself
(1.7 ms of a 20.5 ms pass over the blocks at one row, bench/QUANT.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from modeldeploy.server.contract import cache_root
from modeldeploy.server.engine import block_kernel, quant
from modeldeploy.server.engine.model import KVCache, Step, Transformer

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
        if block_kernel.available():
            block_kernel.define_op()
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
            blocks = DecodeBlocks.install(model, compiled, cache, steps)
    except Exception as exc:  # any compiler failure leaves decode eager
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("decode stays eager: torch.compile failed: %s", first[:300])
        return f"eager: torch.compile failed: {first[:200]}"
    torch.compiler.set_stance("eager_on_recompile")
    model.decode_blocks = blocks
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


def _scratch_input(
    model: Transformer, cache: KVCache, positions: list[list[int]], slots: list[int]
) -> tuple[torch.Tensor, Step]:
    device = cache.k[0].device
    pos = torch.tensor(positions, device=device)
    dtype = model.norm.weight.dtype
    x = torch.randn(len(slots), 1, model.spec.hidden_size, device=device).to(dtype)
    return x, model.step_for(pos, slots, dtype)


def _run(
    model: Transformer, layers: list, cache: KVCache, positions: list[list[int]], slots: list[int]
) -> None:
    """One decode step through `layers` on the scratch cache (never the serving one)."""
    x, step = _scratch_input(model, cache, positions, slots)
    for i, layer in enumerate(layers):
        x = layer(x, step, cache.k[i], cache.v[i])


class DecodeBlocks:
    """The blocks of a decode step through their compiled graphs, minus torch.compile's
    per-call cost.

    Why: a torch.compile'd function checks its guards and runs ~40 lines of Python
    around every call; 24 blocks a step cost 1.7 ms of a 20.5 ms pass at one row and
    2 ms of 43 ms at eight (bench/QUANT.md), where the guards themselves take ~15 µs a
    call.

    How: dynamo keeps, per code object, cache entries of guards plus the bytecode that
    feeds the compiled graph. Blocks that the guards cannot tell apart on any compiled
    variant (their weights differ only in values) form a *kind*. Per step, the first
    block of each kind has its guards checked against the entries, most recently used
    first, and the entry found runs the other blocks of that kind and layout too. When
    no entry accepts a block (a variant not compiled), the blocks of its kind go through
    their torch.compile wrappers, which run them eagerly (`eager_on_recompile`) exactly
    as before. vLLM dispatches to dynamo's compiled bytecode the same way.
    """

    def __init__(
        self,
        layers: list[torch.nn.Module],
        wrappers: list[Callable[..., torch.Tensor]],
        kinds: list[int],
        entries: list[list[tuple[Any, Callable[..., torch.Tensor]]]],
    ) -> None:
        self.layers = layers
        #: The block forward's argument names: the frame locals its guards read.
        self.arg_names = self._arg_names(layers)
        self.wrappers = wrappers
        self.kinds = kinds
        #: Per kind: (guards, code as a function) of the entries that accepted its blocks.
        self.entries = entries
        #: Blocks run through their torch.compile wrapper (no entry accepted them).
        self.fallbacks = 0

    @staticmethod
    def _arg_names(layers: list[torch.nn.Module]) -> tuple[str, ...]:
        code = type(layers[0]).forward.__code__
        return code.co_varnames[: code.co_argcount]

    @staticmethod
    def _frame(
        names: tuple[str, ...], layer: torch.nn.Module, x, step: Step, cache: KVCache, i: int
    ) -> dict[str, Any]:
        """Block `i`'s forward locals, as dynamo's guards read them."""
        return dict(zip(names, (layer, x, step, cache.k[i], cache.v[i]), strict=True))

    @classmethod
    def install(
        cls,
        model: Transformer,
        wrappers: list[Callable[..., torch.Tensor]],
        cache: KVCache,
        steps: list[tuple[list[list[int]], list[int]]],
    ) -> DecodeBlocks:
        """Group the blocks into kinds by what every cache entry's guards say of them on
        every scratch variant, and check, on the first block of each kind and variant,
        that the entry's code gives its torch.compile wrapper's bits."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        layers = list(model.layers)
        forward = type(layers[0]).forward
        found = _debug_get_cache_entry_list(forward.__code__)
        if not found:
            raise RuntimeError("torch.compile left no cache entries for the blocks")
        codes = [types.FunctionType(e.code, forward.__globals__) for e in found]
        names = cls._arg_names(layers)
        signatures: list[list[tuple[bool, ...]]] = [[] for _ in layers]
        for positions, slots in steps:
            x, step = _scratch_input(model, cache, positions, slots)
            checked: set[tuple[bool, ...]] = set()
            for i, layer in enumerate(layers):
                frame = cls._frame(names, layer, x, step, cache, i)
                hits = tuple(bool(e.guard_manager.check(frame)) for e in found)
                if not any(hits):
                    raise RuntimeError(f"no compiled graph accepts block {i}")
                signatures[i].append(hits)
                if hits not in checked:  # the entry's code must give the wrapper's bits
                    checked.add(hits)
                    j = hits.index(True)
                    got = codes[j](layer, x, step, cache.k[i], cache.v[i])
                    if not torch.equal(got, wrappers[i](x, step, cache.k[i], cache.v[i])):
                        raise RuntimeError(f"cache entry {j} disagrees with block {i}'s graph")
        kind_of: dict[tuple, int] = {}
        kinds = [kind_of.setdefault(tuple(sig), len(kind_of)) for sig in signatures]
        entries = []
        for kind in range(len(kind_of)):
            sig = signatures[kinds.index(kind)]
            used = [j for j in range(len(found)) if any(hits[j] for hits in sig)]
            entries.append([(found[j].guard_manager, codes[j]) for j in used])
        return cls(layers, wrappers, kinds, entries)

    def __call__(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        chosen: dict[tuple, Callable[..., torch.Tensor] | None] = {}
        for i, layer in enumerate(self.layers):
            key = (self.kinds[i], x.stride())
            if key in chosen:
                code = chosen[key]
            else:
                code = chosen[key] = self._find(self.kinds[i], layer, x, step, cache, i)
            if code is None:
                self.fallbacks += 1
                x = self.wrappers[i](x, step, cache.k[i], cache.v[i])
            else:
                x = code(layer, x, step, cache.k[i], cache.v[i])
        return x

    def _find(
        self, kind: int, layer: torch.nn.Module, x, step: Step, cache: KVCache, i: int
    ) -> Callable[..., torch.Tensor] | None:
        """The code of the entry whose guards accept block `i` now, moved to the front."""
        frame = self._frame(self.arg_names, layer, x, step, cache, i)
        entries = self.entries[kind]
        for n, (guards, code) in enumerate(entries):
            if guards.check(frame):
                if n:
                    entries.insert(0, entries.pop(n))
                return code
        return None
