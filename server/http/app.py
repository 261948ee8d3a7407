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


def _openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 we never send (validation is a 400 here); drop it."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
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
    app.openapi = _openapi_without_422(app)  # type: ignore[method-assign]
    return app
