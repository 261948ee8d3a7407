"""The FastAPI application factory: routes, error shape, middleware, OpenAPI schema.

`create_app(runtime)` builds a complete app around one `ServerRuntime`; it does not
load anything. `serve.py` starts the loader when the server starts, tests may
drive the same app in-process. Middleware order (outermost first): request
context (id, log, metrics) -> CORS -> body cap -> API key -> routes, so every
answer, a 401 or 413 included, carries the request id and CORS headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from modeldeploy.server.http import native_api, openai_api, probes
from modeldeploy.server.http.errors import install_error_handlers
from modeldeploy.server.http.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from modeldeploy.server.http.runtime import ServerRuntime

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _no_lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield


#: Request properties bounded by the context length / holding token ids, per schema.
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
_TOKEN_FIELDS = ("prompt", "input", "inputs", "tokens")


def _bound_integers(
    node: Any,
    minimum: int | None,
    maximum: int,
    *,
    in_array: bool,
    max_items: int | None = None,
) -> None:
    """Set `maximum` on the integer schemas under `node` (only array items if `in_array`);
    `max_items` bounds the arrays of integers (a token-id prompt's length)."""
    if isinstance(node, list):
        for item in node:
            _bound_integers(item, minimum, maximum, in_array=in_array, max_items=max_items)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "array":
        items = node.get("items")
        if max_items is not None and isinstance(items, dict) and items.get("type") == "integer":
            node["maxItems"] = max_items
        _bound_integers(items, minimum, maximum, in_array=False, max_items=max_items)
        return
    if node.get("type") == "integer" and not in_array:
        node["maximum"] = maximum
        if minimum is not None:
            node["minimum"] = minimum
    for key in ("anyOf", "oneOf", "allOf"):
        _bound_integers(node.get(key), minimum, maximum, in_array=in_array, max_items=max_items)


def _apply_model_limits(
    schema: dict[str, Any], max_model_len: int, max_prompt_tokens: int, vocab_size: int
) -> None:
    """Publish the loaded model's limits: max_tokens <= context, token ids < vocabulary,
    token-id prompts within the prompt limit.

    Clients and fuzzers then learn from /openapi.json what a 400 would tell them.
    """
    prompt_items = min(max_prompt_tokens, max_model_len - 1)
    for component in schema.get("components", {}).get("schemas", {}).values():
        props = component.get("properties", {})
        for name in _LENGTH_FIELDS:
            if name in props:
                _bound_integers(props[name], None, max_model_len, in_array=False)
        for name in _TOKEN_FIELDS:
            if name in props:
                limit = None if name == "tokens" else prompt_items
                _bound_integers(props[name], 0, vocab_size - 1, in_array=True, max_items=limit)


def _openapi(app: FastAPI, runtime: ServerRuntime) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema minus the 422 we never send, plus the model's limits once loaded."""
    original = app.openapi
    built_with_model = False

    def openapi() -> dict[str, Any]:
        nonlocal built_with_model
        engine = runtime.engine
        if app.openapi_schema is not None and (built_with_model or engine is None):
            return app.openapi_schema
        app.openapi_schema = None  # (re)build: first call, or the model has loaded since
        schema = original()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        if engine is not None:
            max_model_len = int(runtime.model_info.get("max_model_len") or 0)
            if max_model_len:
                _apply_model_limits(
                    schema,
                    max_model_len,
                    runtime.settings.max_prompt_tokens,
                    engine.tokenizer.vocab_size,
                )
            built_with_model = True
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(runtime: ServerRuntime, lifespan: Lifespan | None = None) -> FastAPI:
    """The HTTP API for `runtime` (probes, OpenAI, native routes, metrics unless disabled)."""
    settings = runtime.settings
    middleware = [Middleware(RequestContextMiddleware, runtime=runtime)]
    if settings.cors:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        )
    middleware.append(Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes))
    if runtime.api_keys:
        middleware.append(Middleware(ApiKeyMiddleware, keys=runtime.api_keys))

    app = FastAPI(
        title="modeldeploy",
        summary="OpenAI-compatible LLM server (PyTorch), with Kubernetes probes and metrics",
        version="0.1.0",
        middleware=middleware,
        lifespan=lifespan or _no_lifespan,
        # a body without Content-Type is read as JSON (see BodyLimitMiddleware for `curl -d`)
        strict_content_type=False,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(probes.router, tags=["probes"])
    if settings.metrics:
        app.include_router(probes.metrics_router, tags=["probes"])
    app.include_router(openai_api.router, tags=["openai"])
    app.include_router(native_api.router, tags=["native"])
    app.openapi = _openapi(app, runtime)  # type: ignore[method-assign]
    return app
