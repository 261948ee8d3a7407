"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

What an OpenAI SDK expects, field by field: `usage` in every non-streaming reply,
SSE chunks ending in `data: [DONE]`, the usage-only last chunk when
`stream_options.include_usage` is set, `finish_reason` `stop` or `length`, and
logprobs in the chat (`content[]`) or legacy completions (`tokens[]`) layout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from modeldeploy.server.errors import ModeldeployError
from modeldeploy.server.http import logprobs as lp
from modeldeploy.server.http.errors import ApiError, api_error_for, error_body
from modeldeploy.server.http.generation import (
    ClientGone,
    Deadline,
    collect,
    first_event,
    next_event_before,
    sse,
    timeout_error,
    token_events,
    until_done_or_gone,
)
from modeldeploy.server.http.middleware import CLIENT_CLOSED
from modeldeploy.server.http.runtime import ServerRuntime
from modeldeploy.server.http.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from modeldeploy.server.engine.engine import Engine, GenerationEvent
    from modeldeploy.server.engine.sampling import SamplingParams

router = APIRouter()

#: Error statuses an inference route can answer, published in /openapi.json.
INFERENCE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "invalid request (the message names the field)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body too large",
        429: "queue full; retry after Retry-After seconds",
        503: "not ready, draining, poisoned or out of memory",
        504: "timed out; generation cancelled",
    }.items()
}


#: One server-sent event (OpenAPI 3.1: the media type's schema describes each event).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "`data` is a JSON chunk, an error object, or the final `[DONE]`",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}


def _sse_responses(model: type) -> dict[int | str, dict[str, Any]]:
    """200 is JSON, or an event stream when `stream` is true; plus the error statuses."""
    return {
        200: {
            "model": model,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "description": "the completion (JSON), or SSE chunks ending in `data: [DONE]`",
        },
        **INFERENCE_ERRORS,
    }


def runtime_of(request: Request) -> ServerRuntime:
    return request.app.state.runtime


class EventStreamResponse(StreamingResponse):
    """An SSE response that always closes its generator (and so the engine stream).

    Starlette cancels the sending task when the client disconnects; the body
    generator may then be parked at a `yield` and would only be closed by the
    garbage collector. Closing it here frees the generation slot at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type="text/event-stream",
        )
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()  # type: ignore[attr-defined]


def check_max_tokens(runtime: ServerRuntime, max_tokens: int | None, field: str) -> None:
    """400 for a max_tokens that can never fit the model's context (names both numbers)."""
    limit = int(runtime.model_info.get("max_model_len") or 0)
    if max_tokens is not None and limit and max_tokens > limit:
        raise ApiError(
            400,
            f"{field}: {max_tokens} exceeds the model's context length of {limit} tokens",
            code="invalid_value",
            param=field,
        )


def sampling_params(
    body: SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """The engine's SamplingParams from request fields; unset fields keep engine defaults."""
    from modeldeploy.server.engine.sampling import SamplingParams

    fields: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if body.top_k is not None and body.top_k < 0:
        given["top_k"] = 0  # -1 (vLLM) and 0 (llama.cpp) both mean "no top-k"
    # max_tokens=None is OpenAI's "until a stop or the context is full", not the engine default.
    return SamplingParams(
        max_tokens=max_tokens,
        **given,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _stream_error(exc: BaseException, runtime: ServerRuntime) -> bytes:
    """The error event a stream ends with when it fails after its first token."""
    err = timeout_error(runtime) if isinstance(exc, TimeoutError) else api_error_for(exc)
    return sse(error_body(err.status, err.message, err.code, err.param))


async def _sse_body(
    runtime: ServerRuntime,
    first: GenerationEvent | None,
    events: AsyncIterator[GenerationEvent],
    deadline: Deadline,
    *,
    opening: list[dict[str, Any]],
    chunk: Callable[[GenerationEvent], list[dict[str, Any]]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None,
) -> AsyncIterator[bytes]:
    """Shared SSE loop: opening chunks, one or more chunks per event, usage, [DONE]."""
    usage: dict[str, int] | None = None
    try:
        for payload in opening:
            yield sse(payload)
        event = first
        while event is not None:
            for payload in chunk(event):
                yield sse(payload)
            if event.usage is not None:
                usage = usage_dict(event.usage.prompt_tokens, event.usage.completion_tokens)
            event = await next_event_before(events, deadline)
    except (TimeoutError, ModeldeployError, ApiError) as exc:
        yield _stream_error(exc, runtime)
    finally:
        await events.aclose()
    if usage_chunk is not None and usage is not None:
        yield sse(usage_chunk(usage))
    yield sse("[DONE]")


async def _answer(
    request: Request,
    runtime: ServerRuntime,
    prompt: str | list[int],
    params: SamplingParams,
    deadline: Deadline,
    *,
    templated: bool = False,
) -> Any:
    """Non-streaming: the collected generation (ClientGone when the client left).

    `templated`: the prompt is a rendered chat template, which carries its own BOS.
    """
    rid = request.state.request_id
    events = token_events(runtime, prompt, params, rid, add_special_tokens=not templated)
    return await until_done_or_gone(request, runtime, collect(events), deadline)


@router.get("/v1/models", response_model=ModelList, responses=INFERENCE_ERRORS)
async def list_models(request: Request) -> ModelList:
    """The served model (listed while loading too, so clients can discover the name)."""
    runtime = runtime_of(request)
    return ModelList(
        data=[
            ModelCard(
                id=runtime.model_name,
                created=runtime.created,
                root=runtime.settings.source,
                max_model_len=runtime.model_info.get("max_model_len"),
            )
        ]
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_sse_responses(ChatCompletionResponse),
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """Chat completion, streaming (SSE) or not."""
    runtime = runtime_of(request)
    deadline = Deadline.after(runtime.settings.timeout)
    runtime.check_model(body.model)
    engine = runtime.require_engine()
    check_max_tokens(runtime, body.max_tokens, "max_tokens")
    check_max_tokens(runtime, body.max_completion_tokens, "max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    prompt = engine.chat_template(
        [m.template_dict() for m in body.messages],
        tools=body.tools,
        add_generation_prompt=body.add_generation_prompt,
        template_kwargs=body.chat_template_kwargs,  # reserved names -> 400 in the engine
    )
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else 0  # only with logprobs
    params = sampling_params(
        body, max_tokens=max_tokens, logprobs=body.logprobs, top_logprobs=top_logprobs
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = runtime.model_name

    if not body.stream:
        try:
            result = await _answer(request, runtime, prompt, params, deadline, templated=True)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": lp.chat_logprobs(result.logprobs) if body.logprobs else None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage_dict(result.prompt_tokens, result.completion_tokens),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if include_usage:
        base["usage"] = None

    def choice_chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    def chunks_for(event: GenerationEvent) -> list[dict[str, Any]]:
        out = []
        if event.text or event.logprobs:
            logprobs = lp.chat_logprobs(event.logprobs) if body.logprobs else None
            out.append(choice_chunk({"content": event.text}, None, logprobs))
        if event.finish_reason is not None:
            out.append(choice_chunk({}, event.finish_reason))
        return out

    events = token_events(
        runtime, prompt, params, request.state.request_id, add_special_tokens=False
    )
    try:
        first = await first_event(request, runtime, events, deadline)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return EventStreamResponse(
        _sse_body(
            runtime,
            first,
            events,
            deadline,
            opening=[choice_chunk({"role": "assistant", "content": ""}, None)],
            chunk=chunks_for,
            usage_chunk=(lambda u: {**base, "choices": [], "usage": u}) if include_usage else None,
        )
    )


def _prompt_tokens_checked(engine: Engine, prompt: str | list[int]) -> str | list[int]:
    """Token-id prompts must name ids the tokenizer knows (else a 400, not an index error)."""
    if isinstance(prompt, str):
        return prompt
    vocab = engine.tokenizer.vocab_size
    for i, token in enumerate(prompt):
        if not 0 <= token < vocab:
            raise ApiError(
                400,
                f"prompt[{i}]: token id {token} is outside the vocabulary (0..{vocab - 1})",
                code="invalid_value",
                param="prompt",
            )
    return prompt


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=_sse_responses(CompletionResponse),
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Plain text completion, streaming (SSE) or not."""
    runtime = runtime_of(request)
    deadline = Deadline.after(runtime.settings.timeout)
    runtime.check_model(body.model)
    engine = runtime.require_engine()
    check_max_tokens(runtime, body.max_tokens, "max_tokens")
    prompt = _prompt_tokens_checked(engine, body.prompt)
    want_logprobs = body.logprobs is not None
    params = sampling_params(
        body, max_tokens=body.max_tokens, logprobs=want_logprobs, top_logprobs=body.logprobs or 0
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = runtime.model_name
    tokenizer = engine.tokenizer
    echo = ""
    if body.echo:
        echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)

    if not body.stream:
        try:
            result = await _answer(request, runtime, prompt, params, deadline)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": echo + result.text,
                    "logprobs": lp.completion_logprobs(result.logprobs, len(echo))
                    if want_logprobs
                    else None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage_dict(result.prompt_tokens, result.completion_tokens),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
    }
    if include_usage:
        base["usage"] = None
    offset = len(echo)

    def text_chunk(text: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    def chunks_for(event: GenerationEvent) -> list[dict[str, Any]]:
        nonlocal offset
        logprobs = None
        if want_logprobs:
            logprobs = lp.completion_logprobs(event.logprobs, offset)
        offset += len(event.text)
        if event.text or event.finish_reason is not None or event.logprobs:
            return [text_chunk(event.text, event.finish_reason, logprobs)]
        return []

    events = token_events(runtime, prompt, params, request.state.request_id)
    try:
        first = await first_event(request, runtime, events, deadline)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return EventStreamResponse(
        _sse_body(
            runtime,
            first,
            events,
            deadline,
            opening=[text_chunk(echo, None)] if echo else [],
            chunk=chunks_for,
            usage_chunk=(lambda u: {**base, "choices": [], "usage": u}) if include_usage else None,
        )
    )
