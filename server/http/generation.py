"""Running one generation for a request: admission, deadline, disconnect, metrics.

Every inference endpoint goes through `token_events` (slot from the admission
gate, engine stream, TTFT/TPOT/queue/token metrics) and then either
`until_done_or_gone` (non-streaming: the answer, a 504 at the deadline, or
cancellation the moment the client disconnects) or an SSE body that stops as
soon as a send fails. Both paths close the engine stream in `finally`, which is
what frees the engine's slot within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from modeldeploy.server import metrics
from modeldeploy.server.http.errors import ApiError
from modeldeploy.server.http.runtime import ServerRuntime
from starlette.requests import Request

if TYPE_CHECKING:
    from modeldeploy.server.engine.engine import GenerationEvent
    from modeldeploy.server.engine.sampling import SamplingParams

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready; nobody to answer."""


def timeout_error(runtime: ServerRuntime) -> ApiError:
    return ApiError(
        504,
        f"request exceeded the server timeout of {runtime.settings.timeout:g} s (--timeout); "
        "generation was cancelled",
        code="timeout",
    )


@dataclass
class Deadline:
    """The absolute monotonic time by which a request must be answered (`--timeout`)."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


async def token_events(
    runtime: ServerRuntime,
    prompt: str | list[int],
    params: SamplingParams,
    request_id: str,
    *,
    add_special_tokens: bool = True,
) -> AsyncIterator[GenerationEvent]:
    """Events of one generation, holding an admission slot for exactly its lifetime.

    `add_special_tokens=False` for a rendered chat template (it carries its own BOS).
    """
    engine = runtime.require_engine()
    model = runtime.model_name
    start = time.monotonic()
    async with runtime.gate.slot() as queued_s:
        metrics.QUEUE_TIME.labels(model).observe(queued_s)
        stream = engine.generate(prompt, params, request_id, add_special_tokens=add_special_tokens)
        first_at: float | None = None
        last_at = start
        generated = 0
        try:
            async for event in stream:
                if event.token_ids:
                    now = time.monotonic()
                    if first_at is None:
                        first_at = now
                        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - start)
                    last_at = now
                    generated += len(event.token_ids)
                    metrics.GENERATION_TOKENS.labels(model).inc(len(event.token_ids))
                if event.usage is not None:
                    metrics.PROMPT_TOKENS.labels(model).inc(event.usage.prompt_tokens)
                yield event
        finally:
            await stream.aclose()
        if first_at is not None and generated > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(model).observe(
                (last_at - first_at) / (generated - 1)
            )


@dataclass
class Collected:
    """A finished generation, gathered from its events (non-streaming answers)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def collect(events: AsyncIterator[GenerationEvent]) -> Collected:
    """Drain an event stream into one result (closing it however this ends)."""
    out = Collected()
    parts: list[str] = []
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            parts.append(event.text)
            out.token_ids.extend(event.token_ids)
            if event.logprobs:
                out.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                out.finish_reason = event.finish_reason
            if event.usage is not None:
                out.prompt_tokens = event.usage.prompt_tokens
                out.completion_tokens = event.usage.completion_tokens
    out.text = "".join(parts)
    if not out.completion_tokens:
        out.completion_tokens = len(out.token_ids)
    return out


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone (after the body was read, receive() waits for it)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_done_or_gone(
    request: Request, runtime: ServerRuntime, work: Awaitable[T], deadline: Deadline
) -> T:
    """Await `work`; cancel it on disconnect (ClientGone) or at the deadline (504)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=deadline.remaining(), return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if watcher in done:
            raise ClientGone()
        raise timeout_error(runtime)
    finally:
        watcher.cancel()
        if not task.done():  # we were cancelled ourselves (server force-stop)
            task.cancel()


async def first_event(
    request: Request,
    runtime: ServerRuntime,
    events: AsyncIterator[GenerationEvent],
    deadline: Deadline,
) -> GenerationEvent | None:
    """The first event of a stream, before any header is sent.

    Admission (429), prompt errors (400), not-ready (503) and a deadline that runs
    out in the queue (504) therefore still reach the client as proper HTTP
    statuses; only what happens after the first token travels inside the stream.
    """
    try:
        return await until_done_or_gone(request, runtime, anext(events, None), deadline)
    except BaseException:
        await events.aclose()
        raise


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair (`data: ...` and a blank line)."""
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n".encode()


async def next_event_before(
    events: AsyncIterator[GenerationEvent], deadline: Deadline
) -> GenerationEvent | None:
    """The next event or None at the end; TimeoutError when the deadline passes first."""
    async with asyncio.timeout(deadline.remaining()):
        return await anext(events, None)
