"""Continuous batching on a background thread: admit, prefill in chunks, decode together.

All torch work happens on this one thread, never on the event loop, so the HTTP
server stays responsive while the model computes. Every iteration ("step"):

1. under the lock: drop cancelled sequences (their slot is free at once) and admit
   waiting ones into free KV slots, up to `max_concurrent`;
2. prefill: feed prompt chunks of sequences still prefilling, at most `prefill_chunk`
   tokens in total, so a long prompt neither needs activation memory for all of its
   tokens at once nor stalls the streams already decoding for long; chunks of similar
   length run as one padded forward (`prefill_groups`);
3. decode: one batched forward for every sequence that has a token to extend.

A failure inside a step leaves the device in an unknown state (a CUDA error is
sticky), so it poisons the scheduler: every request in flight gets
`ModelPoisonedError` and no new request is admitted until the model is reloaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from modeldeploy.server.engine.errors import EngineClosedError, ModelPoisonedError
from modeldeploy.server.engine.model import KVCache, Transformer
from modeldeploy.server.engine.sampling import (
    RequestSampler,
    SamplingParams,
    TokenChoice,
    sample_batch,
)
from modeldeploy.server.engine.stop_strings import StopStringFilter

log = logging.getLogger("modeldeploy.engine")


@dataclass
class Usage:
    """Token counts of one request (OpenAI `usage`) plus its queue and first-token times."""

    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0
    first_token_seconds: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    """One step of a stream: the new text (may be empty while a stop prefix is held back),
    the token(s) it came from, their logprobs when asked, and on the last event the finish
    reason ('stop' | 'length') and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Sequence:
    """One request inside the scheduler."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    sink: Callable[[GenerationEvent | BaseException], None]
    decoder: Any  # tokenizer's incremental decoder: push(id) -> str, flush() -> str
    stops: StopStringFilter
    arrival: float = field(default_factory=time.monotonic)
    sampler: RequestSampler | None = None
    slot: int = -1
    cached: int = 0  # tokens whose K/V are in the cache
    admitted: float | None = None
    first_token: float | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def output_ids(self) -> list[int]:
        return self.sampler.output_ids if self.sampler else []

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)


#: Most padding a batched prefill may add, as a share of the real tokens it computes.
PREFILL_PAD_SHARE = 0.25


def prefill_groups(
    chunks: list[tuple[Sequence, int]], budget: int, max_len: int
) -> list[list[tuple[Sequence, int]]]:
    """Split one step's prompt chunks `(sequence, tokens)` into forwards run together.

    A chunk of a few dozen tokens alone keeps the CPU kernels at a handful of rows, where
    they run at about half the tokens/s of a few hundred rows (Qwen2.5-0.5B, 8 prompts of
    32 tokens: 1.0 s one by one, 0.59 s in one forward), so chunks of similar length are
    padded to a common width and run as one batch. A group stays within the prefill
    budget counting its padding (the activation memory bound), wastes at most
    `PREFILL_PAD_SHARE` on padding, and every row's padded positions fit in the cache.
    """
    order = sorted(chunks, key=lambda c: (-c[1], c[0].slot))
    groups: list[list[tuple[Sequence, int]]] = []
    for seq, n in order:
        if groups:
            group = groups[-1]
            width = group[0][1]  # the longest chunk: groups fill in descending length
            padded = width * (len(group) + 1)
            real = sum(m for _, m in group) + n
            if (
                seq.cached + width <= max_len
                and padded <= budget
                and padded - real <= PREFILL_PAD_SHARE * real
            ):
                group.append((seq, n))
                continue
        groups.append([(seq, n)])
    for group in groups:
        group.sort(key=lambda c: c[0].slot)
    return groups


@dataclass(frozen=True)
class EngineStats:
    """What the metrics and the 429 decision need: sequences running, waiting, KV fill."""

    running: int
    waiting: int
    kv_usage: float


class Scheduler:
    """Owns the model, the KV cache and the thread that runs them."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        device: torch.device,
        prefill_chunk: int,
        eos_ids: set[int],
        token_text: Callable[[int], str],
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_ids
        self.token_text = token_text
        self.max_len = cache.max_len
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(cache.num_slots))
        self.poison_reason: str | None = None
        self._fault_pending = False
        self._stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="modeldeploy-engine", daemon=True)
        self.thread.start()

    # ---- called from other threads -------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.poison_reason is not None:
                raise ModelPoisonedError(self.poison_reason)
            if self._stopped:
                raise EngineClosedError("the engine is shut down")
            self.waiting.append(seq)
            self.cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Mark for removal; the scheduler frees the slot before its next forward."""
        with self.cond:
            seq.cancelled = True
            self.cond.notify()

    def inject_fault(self) -> None:
        """Test hook: make the next device step raise, as a CUDA error would."""
        with self.cond:
            self._fault_pending = True
            self.cond.notify()

    def stats(self) -> EngineStats:
        with self.cond:
            used = sum(s.cached for s in self.running)
            return EngineStats(
                running=len(self.running),
                waiting=len(self.waiting),
                kv_usage=used / (self.cache.num_slots * self.max_len),
            )

    def stop(self) -> None:
        """Stop the thread; requests still in flight end with EngineClosedError."""
        with self.cond:
            self._stopped = True
            self.cond.notify()
        self.thread.join(timeout=30)
        with self.cond:
            victims = [*self.running, *self.waiting]
            self.running.clear()
            self.waiting.clear()
        for seq in victims:
            seq.done = True
            if not seq.cancelled:
                seq.sink(EngineClosedError("the engine was shut down before this request finished"))

    # ---- the scheduler thread ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                with torch.inference_mode():
                    with self.cond:  # admission may move K/V (compaction): device work too
                        while not self._stopped and not self._admit():
                            self.cond.wait()
                        if self._stopped:
                            return
                    self._step()
            except Exception as exc:  # any failure here leaves the device state unknown
                self._poison(exc)
                return

    def _admit(self) -> bool:
        """Drop cancelled sequences, admit waiting ones; True when there is work to do."""
        for seq in [s for s in self.running if s.cancelled]:
            self._release(seq)
        if self.waiting:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            seq.admitted = time.monotonic()
            seq.sampler = RequestSampler(seq.params, seq.prompt_ids, self.device)
            self.running.append(seq)
        return bool(self.running)

    def _release(self, seq: Sequence) -> None:
        """Take a sequence out and keep the occupied slots contiguous from 0.

        The highest occupant moves into the freed slot (one copy of its cached K/V), so a
        decode batch reads its rows' caches as one slice instead of gathering every row's
        whole history at every step. The slot left free hands its K/V memory back
        (`KVCache.release`). Runs on the scheduler thread only.
        """
        seq.done = True
        if seq not in self.running:
            return
        self.running.remove(seq)
        freed = seq.slot
        top = max(self.running, key=lambda s: s.slot, default=None)
        if top is not None and top.slot > freed:
            self.cache.move(top.slot, freed, top.cached)
            top.slot, freed = freed, top.slot
        self.cache.release(freed)
        self.free_slots.append(freed)
        self.free_slots.sort()

    def _step(self) -> None:
        if self._fault_pending:
            self._fault_pending = False
            raise RuntimeError("injected device fault (test hook)")
        self.steps += 1
        budget = self.prefill_chunk
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilling or seq.cancelled:
                continue
            n = min(budget, len(seq.prompt_ids) - seq.cached)
            budget -= n
            chunks.append((seq, n))
        for group in prefill_groups(chunks, self.prefill_chunk, self.max_len):
            self._prefill(group)
        rows = sorted(
            (s for s in self.running if not s.prefilling and not s.done and not s.cancelled),
            key=lambda s: s.slot,
        )
        rows = [s for s in rows if s.cached < len(s.prompt_ids) + len(s.output_ids)]
        if not rows:
            return
        tokens = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.cached] for s in rows], device=self.device)
        last = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        logits = self.model(tokens, positions, [s.slot for s in rows], self.cache, last)
        for s in rows:
            s.cached += 1
        choices = sample_batch(logits, [s.sampler for s in rows])
        for seq, choice in zip(rows, choices, strict=True):
            self._accept(seq, choice)

    def _prefill(self, group: list[tuple[Sequence, int]]) -> None:
        """One forward over the next prompt chunk of each sequence in `group`.

        Rows are padded to the longest chunk. A padding token sits at the positions after
        its row's chunk, in the row's own slot: its K/V land where that sequence's next
        tokens will be written before anything reads them (and the causal mask hides them
        from the row's real tokens), so padding never reaches a result.
        """
        width = max(n for _, n in group)
        tokens, positions = [], []
        for seq, n in group:
            chunk = seq.prompt_ids[seq.cached : seq.cached + n]
            tokens.append(chunk + [chunk[-1]] * (width - n))
            positions.append(list(range(seq.cached, seq.cached + width)))
        tokens_t = torch.tensor(tokens, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        last = torch.tensor([n - 1 for _, n in group], device=self.device)
        slots = [seq.slot for seq, _ in group]
        logits = self.model(tokens_t, positions_t, slots, self.cache, last)
        done = []
        for row, (seq, n) in enumerate(group):
            seq.cached += n
            if not seq.prefilling:
                done.append((row, seq))
        if done:
            picked = logits[[row for row, _ in done]]
            choices = sample_batch(picked, [seq.sampler for _, seq in done])
            for (_, seq), choice in zip(done, choices, strict=True):
                self._accept(seq, choice)

    def _accept(self, seq: Sequence, choice: TokenChoice) -> None:
        """Turn a sampled token into text, decide whether the sequence ends, emit the event."""
        now = time.monotonic()
        if seq.first_token is None:
            seq.first_token = now
        tok = choice.token_id
        params = seq.params
        finish: str | None = None
        if tok in params.stop_token_ids or (tok in self.eos_ids and not params.ignore_eos):
            finish = "stop"
            text = seq.stops.push(seq.decoder.flush()) + seq.stops.flush()
        else:
            text = seq.stops.push(seq.decoder.push(tok))
            if seq.stops.matched is not None:
                finish = "stop"
            elif (
                len(seq.output_ids) >= seq.max_new
                or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_len
            ):
                finish = "length"
                text += seq.stops.push(seq.decoder.flush()) + seq.stops.flush()
        event = GenerationEvent(text=text, token_ids=[tok], finish_reason=finish)
        if params.logprobs:
            event.logprobs = [self._logprob_entry(choice)]
        if finish is not None:
            event.usage = Usage(
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                queue_seconds=(seq.admitted or now) - seq.arrival,
                first_token_seconds=seq.first_token - seq.arrival,
            )
            with self.cond:
                self._release(seq)
        if not seq.cancelled:
            seq.sink(event)

    def _logprob_entry(self, choice: TokenChoice) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {
                "token": text,
                "token_id": token_id,
                "logprob": logprob,
                "bytes": list(text.encode("utf-8")),
            }

        entry = one(choice.token_id, choice.logprob if choice.logprob is not None else 0.0)
        entry["top_logprobs"] = [one(t, lp) for t, lp in (choice.top or [])]
        return entry

    def _poison(self, exc: BaseException) -> None:
        reason = (
            f"a device step failed ({type(exc).__name__}: {exc}); "
            "the model must be reloaded (restart the server)"
        )
        log.error("engine poisoned: %s", reason, exc_info=exc)
        with self.cond:
            self.poison_reason = reason
            victims = [*self.running, *self.waiting]
            self.running.clear()
            self.waiting.clear()
        for seq in victims:
            seq.done = True
            if not seq.cancelled:
                seq.sink(ModelPoisonedError(reason))
