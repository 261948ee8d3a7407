"""The engine's public API: load a model, generate streams of text, report state.

The HTTP layer talks only to `Engine` (never to torch): `Engine.load(...)` builds the
model from whatever the formats layer found, and `engine.generate(...)` returns an
async stream of `GenerationEvent`s fed by the scheduler thread. Admission checks
(poisoned model, prompt too long, device memory, queue length) run synchronously in
`generate`, so a request is refused with a typed error before any response starts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from modeldeploy.server.contract import cache_root
from modeldeploy.server.engine import block_kernel, weights
from modeldeploy.server.engine import quant as qlayers
from modeldeploy.server.engine.chat_template import ChatTemplate
from modeldeploy.server.engine.cpu import configure_threads
from modeldeploy.server.engine.device import (
    Placement,
    choose_placement,
    kv_cache_dtype,
    memory_info,
)
from modeldeploy.server.engine.errors import (
    ChatTemplateError,
    EngineClosedError,
    EngineOverloadedError,
    InsufficientMemoryError,
    ModelPoisonedError,
    NoChatTemplateError,
    PromptTooLongError,
)
from modeldeploy.server.engine.memory import loading_heap, release_free_heap
from modeldeploy.server.engine.model import KVCache, ModelSpec, Transformer
from modeldeploy.server.engine.sampling import SamplingParams
from modeldeploy.server.engine.scheduler import (
    EngineStats,
    GenerationEvent,
    Scheduler,
    Sequence,
    Usage,
)
from modeldeploy.server.engine.stop_strings import StopStringFilter
from modeldeploy.server.engine.tokenizer import Tokenizer
from modeldeploy.server.errors import UserInputError

__all__ = ["Engine", "EngineStats", "GenerationEvent", "GenerationStream", "Usage"]

log = logging.getLogger("modeldeploy.engine")

#: Environment switch for reliability tests: poison on the first device step.
FAULT_ENV = "MODELDEPLOY_INJECT_DEVICE_FAULT"
#: Share of free memory the KV cache may take when --max-model-len is not given.
KV_MEMORY_SHARE = 0.5
#: Headroom (bytes) a CUDA prefill step must find free besides its activation estimate.
CUDA_HEADROOM = 256 << 20

Progress = Callable[[int, int, str], None]

#: Names a request's `chat_template_kwargs` may not use: ChatTemplate.render's own
#: arguments (messages, tools, add_generation_prompt, bos_token, ...), which the engine
#: sets itself. Passing one twice would be a TypeError (a 500) instead of a 400.
RESERVED_TEMPLATE_KWARGS = frozenset(
    name
    for name, param in inspect.signature(ChatTemplate.render).parameters.items()
    if param.kind is not inspect.Parameter.VAR_KEYWORD
)


def quant_cache_dir() -> Path | None:
    """Where converted quantized layers are cached between loads (quant.py, mmap'd on a hit):
    $MODELDEPLOY_QUANT_CACHE if a directory, off if "0", else `cache_root()/quant`."""
    env = os.environ.get(qlayers.CACHE_ENV, "").strip()
    if env.lower() in ("0", "off", "false", "no"):
        return None
    return Path(env) if env else cache_root() / "quant"


class GenerationStream:
    """Async iterator over one request's events; closing or cancelling it frees the slot.

    `async for ev in engine.generate(...)` is the normal use; `await engine.generate(...)`
    returns the same object for callers that prefer to await first.
    """

    def __init__(self, scheduler: Scheduler, seq: Sequence, queue: asyncio.Queue) -> None:
        self._scheduler = scheduler
        self._seq = seq
        self._queue = queue
        self._finished = False
        self.request_id = seq.request_id
        self.prompt_tokens = len(seq.prompt_ids)

    def __aiter__(self) -> GenerationStream:
        return self

    def __await__(self):
        async def itself() -> GenerationStream:
            return self

        return itself().__await__()

    async def __anext__(self) -> GenerationEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # CancelledError from a disconnecting client, or anything else
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._finished:
            self._finished = True
            self._scheduler.cancel(self._seq)

    def __del__(self) -> None:
        if not self._finished and not self._seq.done:
            self._seq.cancelled = True  # a plain flag write; the scheduler drops it next step


class Engine:
    """A loaded model with its tokenizer, template, KV cache and scheduler thread."""

    def __init__(self) -> None:  # use Engine.load
        self.scheduler: Scheduler | None = None
        self.served_model_name = ""
        self.closed = False
        self.quant_report: qlayers.QuantReport | None = None
        self.weights_info: dict[str, Any] = {}

    # ---- loading -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        *,
        slug_dir: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_concurrent: int = 10,
        max_model_len: int | None = None,
        max_prompt_tokens: int = 16384,
        prefill_chunk: int = 512,
        chat_template_file: str | Path | None = None,
        progress: Progress | None = None,
        quant: str | None = None,
        max_queue: int | None = None,
        quant_policy: str | None = None,
        defer_packing: bool = False,
    ) -> Engine:
        """Open, build, fill and start serving a model; raises typed errors for bad input.

        `quant` picks a GGUF file among several (the formats layer); `quant_policy`
        (default: $MODELDEPLOY_QUANT_POLICY, else auto) says how a GGUF's weights are held
        on a CPU: see `_weight_policy`. `defer_packing` (a server) leaves FBGEMM's
        packing of the int8 gate|up projections, ~0.55 s of a 2.5 s cached start, to
        `settle_weights` after ready; the weight-only int8 kernel serves them until then.
        """
        from modeldeploy.server.formats import open_model

        if max_concurrent < 1:
            raise UserInputError(f"--max-concurrent {max_concurrent}: must be at least 1")
        if prefill_chunk < 1:
            raise UserInputError(f"--prefill-chunk {prefill_chunk}: must be at least 1")
        started = time.monotonic()
        self = cls()
        with loading_heap():
            files = open_model(model_path, quant)
            self.files = files
            self.source = str(model_path)
            self.served_model_name = Path(str(model_path)).name
            self.config = files.config
            self.spec = ModelSpec.from_config(files.config, source=str(files.path))
            self.placement: Placement = choose_placement(device, dtype)
            policy_name = (
                (quant_policy or os.environ.get(qlayers.POLICY_ENV) or "auto").strip().lower()
            )
            policy = qlayers.QuantPolicy.parse(policy_name)  # bad names fail before the slow part
            if self.placement.device.type == "cpu":
                self.threads: int | None = configure_threads()
            else:
                self.threads = None
            log.info(
                "loading %s (%s, %s) on %s as %s — %s",
                files.path,
                files.format,
                self.spec.architecture,
                self.placement.device,
                self.placement.dtype_name,
                self.placement.reason,
            )
            model_ctx = int(files.config.max_position_embeddings)
            if max_model_len is not None:  # bad flags fail before the slow part
                self._choose_max_len(max_model_len, model_ctx, max_concurrent)
            self.max_prompt_tokens = max_prompt_tokens
            self.max_concurrent = max_concurrent
            self.prefill_chunk = prefill_chunk
            self.max_queue = max_queue

            dev, dt = self.placement.device, self.placement.dtype
            model = Transformer(self.spec)
            use_kernels, why = self._weight_policy(policy_name)
            report: qlayers.QuantReport | None = None
            if files.gguf is not None:
                arch = str(files.gguf.metadata.get("general.architecture", self.spec.architecture))
                if use_kernels:  # before materialize: swapped layers never exist densely
                    report = qlayers.quantize_gguf_model(
                        model,
                        files.gguf,
                        dtype=dt,
                        device=dev,
                        policy=policy,
                        permuted=arch in weights.GGUF_PERMUTED_ARCHS,
                        cache_dir=quant_cache_dir(),
                        progress=progress,
                        pack=not defer_packing,
                    )
                model.materialize(dev, dt)
                skip = report.consumed if report else ()
                weights.load_gguf(model, files.gguf, arch, str(files.path), progress, skip=skip)
            else:
                model.materialize(dev, dt)
                weights.load_safetensors(model, files.safetensors, str(files.path), progress)
            model.eval()
            release_free_heap()  # the conversion/packing temporaries, before the tokenizer's
            self.model = model
            self.quant_report = report
            self.weights_info = {
                "policy": policy_name,
                "quantized": report is not None,
                "reason": why,
            }
            if report is not None:
                self.weights_info["segments"] = report.summary()["segments"]
                self.weights_info["quantized_bytes"] = report.nbytes
                self.weights_info["cache_hit"] = report.cache_hit
            # sized after the weights are in place, so "free memory" excludes them
            self.kv_dtype = kv_cache_dtype(dev, dt)
            self.max_model_len = self._choose_max_len(max_model_len, model_ctx, max_concurrent)
            self.cache = KVCache(self.spec, max_concurrent, self.max_model_len, self.kv_dtype, dev)

            tok_dir = Path(slug_dir) if slug_dir else files.model_dir
            gguf_meta = files.gguf.metadata if files.gguf is not None else None
            self.tokenizer = Tokenizer.from_files(tok_dir, gguf_meta)
            self.template = ChatTemplate.load(tok_dir, gguf_meta, chat_template_file)
            # config.json + generation_config.json (formats) and the tokenizer's own end tokens
            self.eos_token_ids = set(files.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
            self.scheduler = Scheduler(
                model,
                self.cache,
                device=dev,
                prefill_chunk=prefill_chunk,
                eos_ids=self.eos_token_ids,
                token_text=lambda i: self.tokenizer.decode([i], skip_special_tokens=False),
            )
            if os.environ.get(FAULT_ENV, "") not in ("", "0"):
                self.inject_fault()
            if files.gguf is not None:
                files.gguf.release_pages()
            release_free_heap()
        self.load_seconds = time.monotonic() - started
        log.info(
            "loaded %s in %.1fs: %d parameters, max_model_len %d, %d slots, KV cache %.0f MiB",
            self.spec.architecture,
            self.load_seconds,
            self.num_parameters,
            self.max_model_len,
            max_concurrent,
            self.cache.nbytes / 2**20,
        )
        return self

    def _weight_policy(self, name: str) -> tuple[bool, str]:
        """Whether GGUF weights go to quant's int4/int8 CPU kernels, and why (for /model).

        The kernels exist only on CPU. torch's compute in bfloat16, so `auto` uses them
        only when the model runs in bfloat16 anyway, or where `auto` chose float32 (a CPU
        without native bf16) and our block kernel, which reads float32 rows, runs: an
        explicit --dtype float32 stays exact (the float reference). int8/int4 force them
        whatever the dtype; dense never.
        """
        if self.files.gguf is None:
            return False, "SafeTensors weights are loaded as stored"
        if self.placement.device.type != "cpu":
            return False, f"int4/int8 kernels are CPU-only; {self.placement.device} runs dense"
        if name == "dense":
            return False, "policy dense: GGUF weights dequantized to the model dtype"
        if not qlayers.cpu_kernels_available():
            return False, "this torch build lacks the CPU int4/int8 kernels; dense"
        blocks = not self.placement.explicit and block_kernel.available()
        if name == "auto" and self.placement.dtype != torch.bfloat16 and not blocks:
            return False, (
                f"policy auto with dtype {self.placement.dtype_name}: kernels compute in "
                "bfloat16, so the float weights stay exact"
            )
        if name == "auto" and blocks:
            return True, (
                "policy auto: Q5_0 in its own blocks, Q4_0/Q4_1/Q4_K as 4-bit blocks with "
                "fp16 scales and minimums, other quantized types as 7-bit blocks (block "
                f"kernel, {block_kernel.variant()} build), float tensors dense"
            )
        return True, (
            f"policy {name}: Q4_0/Q4_1/Q4_K as int4 groups (exact), other quantized types "
            f"as {qlayers.QuantPolicy.parse(name).requant.value}, float tensors dense"
        )

    def _choose_max_len(self, requested: int | None, model_ctx: int, slots: int) -> int:
        """--max-model-len if given (bounded by the model), else the model's context,
        shrunk so the static KV cache takes at most half of the free memory."""
        if requested is not None:
            if requested < 2:
                raise UserInputError(f"--max-model-len {requested}: must be at least 2")
            if requested > model_ctx:
                raise UserInputError(
                    f"--max-model-len {requested}: larger than the model's context "
                    f"length {model_ctx}"
                )
            return requested
        per_token = self.spec.kv_bytes_per_token * torch.finfo(self.kv_dtype).bits // 8
        free = memory_info(self.placement.device).get("free_bytes")
        if not free:
            return model_ctx
        fits = int(free * KV_MEMORY_SHARE) // (per_token * slots)
        if fits < model_ctx:
            log.warning(
                "max_model_len %d (of %d) so that %d slots of KV cache fit in %.0f%% of free "
                "memory; set --max-model-len or --max-concurrent to change",
                fits,
                model_ctx,
                slots,
                KV_MEMORY_SHARE * 100,
            )
        return max(2, min(model_ctx, fits))

    # ---- requests ----------------------------------------------------------------------

    @property
    def poisoned(self) -> bool:
        return self.scheduler is not None and self.scheduler.poison_reason is not None

    @property
    def poison_reason(self) -> str | None:
        return self.scheduler.poison_reason if self.scheduler else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the model's (or --chat-template's) template.

        `template_kwargs` are a request's `chat_template_kwargs` (extra template variables):
        a name the engine sets itself is refused with ChatTemplateError (HTTP 400).
        """
        extra = dict(template_kwargs or {})
        clash = sorted(k for k in extra if not isinstance(k, str) or k in RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise ChatTemplateError(
                f"chat_template_kwargs key {clash[0]!r}: reserved, the server sets it itself "
                f"(reserved: {', '.join(sorted(RESERVED_TEMPLATE_KWARGS - {'self'}))})"
            )
        extra.update(kwargs)
        if self.template is None:
            raise NoChatTemplateError(
                f"model {self.served_model_name} has no chat template; use /v1/completions "
                "or start the server with --chat-template FILE"
            )
        return self.template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=getattr(self.tokenizer, "bos_token", None) or "",
            eos_token=getattr(self.tokenizer, "eos_token", None) or "",
            **extra,
        )

    def settle_weights(self, compile_decode: bool = False) -> None:
        """What a server does once it reported ready, on a background thread: pack
        the FBGEMM layers a `defer_packing` load left (~0.55 s), move weights still read
        from the conversion cache's file mapping into memory that may get huge pages,
        pack a rescored head's fast pass (`quant.settle`, ~2 s of one core), then, with
        `compile_decode`, compile the decode step (`compiled`).

        GET /model shows `weights.settled` false until all of it is done and
        `weights.decode_step` what decode runs as.
        """
        report = self.quant_report
        segments: list[Any] = []
        heads: list[Any] = []
        packs: list[Any] = []
        mapped = False
        if report is not None:
            segments, report.mapped = report.mapped, []
            heads, report.heads = report.heads, []
            packs, report.packs = report.packs, []
            mapped = report.cache_hit
        if not (segments or heads or packs or compile_decode):
            return
        self.weights_info["settled"] = False
        if compile_decode:
            self.weights_info["decode_step"] = "compiling"

        def settle() -> None:
            qlayers.settle(segments, heads, packs, mapped)
            if compile_decode:
                from modeldeploy.server.engine.compiled import compile_decode as build

                device = self.placement.device
                self.weights_info["decode_step"] = build(self.model, self.kv_dtype, device)
            self.weights_info["settled"] = True

        threading.Thread(target=settle, name="modeldeploy-weights", daemon=True).start()

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        add_special_tokens: bool = True,
    ) -> GenerationStream:
        """Admit a request and return its event stream (raises before any work if refused).

        `add_special_tokens=False` for text that already carries them (a rendered chat
        template starts with its own BOS).
        """
        scheduler = self._require_scheduler()
        params.validate()
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise UserInputError(
                    f"prompt token id {bad[0]} is outside the vocabulary "
                    f"(0..{self.spec.vocab_size - 1})"
                )
        if not ids:
            raise UserInputError("prompt is empty (no tokens after tokenization)")
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens, "--max-prompt-tokens limit")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                len(ids), self.max_model_len - 1, "maximum prompt length for the context window"
            )
        self._check_memory()
        stats = scheduler.stats()
        if self.max_queue is not None and stats.waiting >= self.max_queue:
            raise EngineOverloadedError(
                f"{stats.waiting} requests already wait for a slot (--max-queue {self.max_queue})"
            )
        room = self.max_model_len - len(ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item: GenerationEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone; nobody is listening
                pass

        seq = Sequence(
            request_id=request_id,
            prompt_ids=ids,
            params=params,
            max_new=max_new,
            sink=sink,
            decoder=self.tokenizer.incremental_decoder(),
            stops=StopStringFilter(list(params.stop)),
        )
        scheduler.submit(seq)
        return GenerationStream(scheduler, seq, queue)

    def _require_scheduler(self) -> Scheduler:
        if self.scheduler is None or self.closed:
            raise EngineClosedError("the engine is shut down")
        if self.scheduler.poison_reason is not None:
            raise ModelPoisonedError(self.scheduler.poison_reason)
        return self.scheduler

    def _check_memory(self) -> None:
        """On CUDA, refuse a request when a prefill chunk's activations would not fit."""
        dev = self.placement.device
        if dev.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(dev)
        need = self.activation_bytes() + CUDA_HEADROOM
        if free < need:
            raise InsufficientMemoryError(
                f"not enough free GPU memory for a prefill step: {free >> 20} MiB free, "
                f"need about {need >> 20} MiB"
            )

    def activation_bytes(self) -> int:
        """Rough peak activation memory of one prefill chunk (bytes)."""
        s = self.spec
        width = (
            (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
            + 3 * max(s.intermediate_size, s.moe_intermediate_size)
            + 4 * s.hidden_size
        )
        elem = torch.finfo(self.placement.dtype).bits // 8
        scores = s.num_heads * self.prefill_chunk * self.max_model_len * 4
        return self.prefill_chunk * width * elem + scores + s.vocab_size * 4 * self.max_concurrent

    def inject_fault(self) -> None:
        """Test hook: the next device step raises, poisoning the engine like a CUDA error."""
        self._require_scheduler().inject_fault()

    def stats(self) -> EngineStats:
        if self.scheduler is None:
            return EngineStats(0, 0, 0.0)
        return self.scheduler.stats()

    def close(self) -> None:
        """Stop the scheduler thread (in-flight requests are abandoned)."""
        self.closed = True
        if self.scheduler is not None:
            self.scheduler.stop()

    # ---- introspection -----------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """Logical weights, whether held as parameters or as quantized layers."""
        n = sum(p.numel() for p in self.model.parameters())
        # a RescoredHead's exact rows are the same logical weights as its coarse layer
        skip = {id(m.exact) for m in self.model.modules() if isinstance(m, qlayers.RescoredHead)}
        for m in self.model.modules():
            if id(m) in skip:
                continue
            if isinstance(m, qlayers.QuantLinear):
                n += m.in_features * m.out_features
            elif isinstance(m, qlayers.QuantEmbedding):
                n += m.num_embeddings * m.embedding_dim
        return n

    def info(self) -> dict[str, Any]:
        """What GET /model shows: format, architecture, dtype and why, device, memory, limits."""
        files = self.files
        weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.quant_report is not None:  # quantized data are plain attributes, not params
            weights_bytes += self.quant_report.nbytes
        metadata: dict[str, Any] = {}
        if files.gguf is not None:
            for key, value in files.gguf.metadata.items():
                if isinstance(value, list | tuple) or hasattr(value, "shape"):
                    continue  # token tables: thousands of entries, see /tensors and inspect
                metadata[key] = value
        return {
            "source": self.source,
            "path": str(files.path),
            "format": str(getattr(files.format, "value", files.format)),
            "architecture": self.spec.architecture,
            "dtype": self.placement.dtype_name,
            "dtype_reason": self.placement.reason,
            "device": str(self.placement.device),
            "threads": self.threads,
            "parameters": self.num_parameters,
            "weights": self.weights_info,
            "memory": {
                "weights_bytes": weights_bytes,
                "kv_cache_bytes": self.cache.nbytes,
                "device": memory_info(self.placement.device),
            },
            "max_model_len": self.max_model_len,
            "context_length": int(self.config.max_position_embeddings),
            "max_concurrent": self.max_concurrent,
            "max_prompt_tokens": self.max_prompt_tokens,
            "prefill_chunk": self.prefill_chunk,
            "eos_token_ids": sorted(self.eos_token_ids),
            "chat_template": self.template is not None,
            "load_seconds": round(self.load_seconds, 3),
            "poisoned": self.poisoned,
            "config": self.config.to_dict(),
            "metadata": metadata,
        }

    def tensors(self) -> list[dict[str, Any]]:
        """The checkpoint's tensors (name, dtype, shape) for GET /tensors."""
        return list(weights.iter_tensor_rows(self.files))
