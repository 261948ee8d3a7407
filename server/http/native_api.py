"""Routes beyond OpenAI: the seed's /predict API, llama.cpp's /tokenize family, model info.

`/predict` and `/predict/batch` map `{"input": ...}` onto a plain completion
(temperature 0 by default: a prediction API is expected to be repeatable);
`/tokenize`, `/detokenize` and `/apply-template` have llama.cpp's shapes so its
tooling works unchanged; `/model`, `/tensors` and `/models` describe what is
loaded and how busy it is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from modeldeploy.server.http.errors import ApiError
from modeldeploy.server.http.generation import (
    ClientGone,
    Collected,
    Deadline,
    collect,
    token_events,
    until_done_or_gone,
)
from modeldeploy.server.http.middleware import CLIENT_CLOSED
from modeldeploy.server.http.openai_api import INFERENCE_ERRORS, check_max_tokens, runtime_of
from modeldeploy.server.http.runtime import ServerRuntime
from modeldeploy.server.http.schemas import (
    PREDICT_MAX_TOKENS,
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    PredictBatchRequest,
    PredictBatchResponse,
    PredictRequest,
    PredictResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from modeldeploy.server.http.state import Phase

router = APIRouter()


def _check_token_ids(runtime: ServerRuntime, ids: list[int], field: str) -> None:
    engine = runtime.require_engine()
    vocab = engine.tokenizer.vocab_size
    for i, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise ApiError(
                400,
                f"{field}[{i}]: token id {token} is outside the vocabulary (0..{vocab - 1})",
                code="invalid_value",
                param=field,
            )


def _predict_params(body: PredictRequest | PredictBatchRequest, runtime: ServerRuntime) -> Any:
    """Plain-completion parameters; an explicit max_tokens must fit the context (400)."""
    from modeldeploy.server.engine.sampling import SamplingParams

    runtime.require_engine()  # 503 first: not ready, draining, poisoned
    check_max_tokens(runtime, body.max_tokens, "max_tokens")
    max_tokens = body.max_tokens or PREDICT_MAX_TOKENS  # the engine stops at the context end
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, stop=body.stop or [])


@router.post("/predict", response_model=PredictResponse, responses=INFERENCE_ERRORS)
async def predict(body: PredictRequest, request: Request) -> Any:
    """One prediction: `input` (text or token ids) -> generated `output`."""
    runtime = runtime_of(request)
    deadline = Deadline.after(runtime.settings.timeout)
    params = _predict_params(body, runtime)
    if isinstance(body.input, list):
        _check_token_ids(runtime, body.input, "input")
    start = time.monotonic()
    events = token_events(runtime, body.input, params, request.state.request_id)
    try:
        result = await until_done_or_gone(request, runtime, collect(events), deadline)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return PredictResponse(
        output=result.text,
        latency_ms=round((time.monotonic() - start) * 1000, 3),
        tokens=result.completion_tokens,
    )


@router.post("/predict/batch", response_model=PredictBatchResponse, responses=INFERENCE_ERRORS)
async def predict_batch(body: PredictBatchRequest, request: Request) -> Any:
    """Several predictions generated concurrently; outputs in input order."""
    runtime = runtime_of(request)
    deadline = Deadline.after(runtime.settings.timeout)
    params = _predict_params(body, runtime)
    if len(body.inputs) > runtime.gate.capacity:
        raise ApiError(
            400,
            f"inputs: {len(body.inputs)} items exceed the server's capacity of "
            f"{runtime.gate.capacity} (--max-concurrent plus --max-queue)",
            param="inputs",
        )
    for i, item in enumerate(body.inputs):
        if isinstance(item, list):
            _check_token_ids(runtime, item, f"inputs[{i}]")
    runtime.gate.check(len(body.inputs))  # all fit, or 429 before any starts
    rid = request.state.request_id
    start = time.monotonic()

    async def run_all() -> list[Collected]:
        return list(
            await asyncio.gather(
                *(
                    collect(token_events(runtime, item, params, f"{rid}-{i}"))
                    for i, item in enumerate(body.inputs)
                )
            )
        )

    try:
        results = await until_done_or_gone(request, runtime, run_all(), deadline)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return PredictBatchResponse(
        output=[r.text for r in results],
        latency_ms=round((time.monotonic() - start) * 1000, 3),
        tokens=sum(r.completion_tokens for r in results),
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=INFERENCE_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    """Text -> token ids (llama.cpp shape; `with_pieces` adds each token's text)."""
    engine = runtime_of(request).require_engine()
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(body.content, add_special_tokens=body.add_special)
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = []
    for token in ids:
        raw = tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" in raw:  # a partial UTF-8 sequence: llama.cpp sends the bytes instead
            pieces.append({"id": token, "piece": list(raw.encode("utf-8", "replace"))})
        else:
            pieces.append({"id": token, "piece": raw})
    return {"tokens": pieces}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=INFERENCE_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    """Token ids -> text (special tokens kept, as llama.cpp does)."""
    runtime = runtime_of(request)
    _check_token_ids(runtime, body.tokens, "tokens")
    tokenizer = runtime.require_engine().tokenizer
    return {"content": tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.post("/apply-template", response_model=ApplyTemplateResponse, responses=INFERENCE_ERRORS)
async def apply_template(body: ApplyTemplateRequest, request: Request) -> Any:
    """The prompt text the chat template makes of these messages (llama.cpp)."""
    engine = runtime_of(request).require_engine()
    prompt = engine.chat_template(
        [m.template_dict() for m in body.messages],
        tools=body.tools,
        add_generation_prompt=body.add_generation_prompt,
    )
    return {"prompt": prompt}


def _loaded_engine(runtime: ServerRuntime) -> Any:
    """The engine for read-only info: available when loaded, even while draining."""
    if runtime.engine is None:
        phase = runtime.lifecycle.phase
        raise ApiError(503, f"no model loaded yet ({phase.value})", code="not_ready")
    return runtime.engine


@router.get("/model", responses=INFERENCE_ERRORS)
async def model_info(request: Request) -> dict[str, Any]:
    """What is loaded: format, architecture, metadata, dtype, device, memory."""
    runtime = runtime_of(request)
    engine = _loaded_engine(runtime)
    info = dict(engine.info())
    info.setdefault("model", runtime.model_name)
    info["source"] = runtime.settings.source
    if runtime.harvest is not None:
        info["slug"] = runtime.harvest.slug
        info["slug_dir"] = runtime.harvest.slug_dir
    return info


@router.get("/tensors", responses=INFERENCE_ERRORS)
async def tensors(request: Request) -> dict[str, Any]:
    """Every weight tensor: name, dtype, shape."""
    engine = _loaded_engine(runtime_of(request))
    items = list(engine.tensors())
    return {"count": len(items), "tensors": items}


@router.get("/models", responses=INFERENCE_ERRORS)
async def loaded_models(request: Request) -> dict[str, Any]:
    """Loaded models with status (loaded|poisoned or the load phase), devices and slot use."""
    runtime = runtime_of(request)
    engine = runtime.engine
    phase = runtime.lifecycle.phase
    entry: dict[str, Any] = {
        "id": runtime.model_name,
        "source": runtime.settings.source,
        "running": runtime.gate.running,
        "waiting": runtime.gate.waiting,
        "max_concurrent": runtime.gate.max_concurrent,
        "max_queue": runtime.gate.max_queue,
    }
    if engine is None:
        entry["status"] = phase.value
        entry["devices"] = []
    else:
        info = runtime.model_info
        entry["status"] = "poisoned" if engine.poisoned else "loaded"
        if engine.poisoned:
            entry["reason"] = getattr(engine, "poison_reason", None)
        entry["devices"] = [info.get("device")] if info.get("device") else []
        for key in ("format", "architecture", "dtype", "max_model_len"):
            if key in info:
                entry[key] = info[key]
        stats = engine.stats()
        entry["engine_running"] = stats.running
        entry["kv_cache_usage"] = stats.kv_usage
        entry["ready"] = phase is Phase.READY
    return {"object": "list", "data": [entry]}
