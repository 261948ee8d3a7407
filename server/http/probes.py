"""Kubernetes probes and Prometheus: /health, /ready, /metrics.

Liveness (`/health`) fails only when restarting the container would help: the
model is poisoned by a device error, or loading failed for good. Readiness
(`/ready`) is 200 only when harvested, loaded and warmed, and says which phase it
is in (with progress) otherwise, so `kubectl describe` and the operator can show
why a pod is not serving yet.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from modeldeploy.server import metrics
from modeldeploy.server.contract import HEALTH_PATH, METRICS_PATH, READY_PATH
from modeldeploy.server.http.runtime import ServerRuntime
from modeldeploy.server.http.schemas import HealthResponse, ReadyResponse
from modeldeploy.server.http.state import Phase
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()
metrics_router = APIRouter()


def _runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime


@router.get(
    HEALTH_PATH,
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "poisoned or failed: restart me"}},
)
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while serving or still loading; 503 once poisoned or failed."""
    runtime = _runtime(request)
    uptime = round(time.monotonic() - runtime.lifecycle.started_at, 3)
    if runtime.poisoned:
        status, code = "poisoned", 503
    elif runtime.lifecycle.phase is Phase.FAILED:
        status, code = "failed", 503
    else:
        status, code = "healthy", 200
    body = {"status": status, "model": runtime.model_name, "uptime_secs": uptime}
    return JSONResponse(body, status_code=code)


@router.get(
    READY_PATH,
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready: status says why"}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 only when ready; 503 with status, progress and reason otherwise."""
    runtime = _runtime(request)
    body: dict[str, Any] = runtime.lifecycle.snapshot()
    body["model"] = runtime.model_name
    if runtime.poisoned and body["status"] == Phase.READY.value:
        body["status"] = Phase.FAILED.value
        body["reason"] = f"model poisoned: {getattr(runtime.engine, 'poison_reason', None)}"
    return JSONResponse(body, status_code=200 if body["status"] == Phase.READY.value else 503)


def refresh_gauges(runtime: ServerRuntime) -> None:
    """Gauges that describe 'now' are read at scrape time, not on every token."""
    model = runtime.model_name
    waiting = runtime.gate.waiting
    running = runtime.gate.running
    engine = runtime.engine
    if engine is not None:
        stats = engine.stats()
        running = stats.running
        waiting += stats.waiting
        metrics.KV_CACHE_USAGE.labels(model).set(stats.kv_usage)
        metrics.MODEL_POISONED.labels(model).set(1 if engine.poisoned else 0)
    metrics.REQUESTS_RUNNING.labels(model).set(running)
    metrics.REQUESTS_WAITING.labels(model).set(waiting)


@metrics_router.get(
    METRICS_PATH,
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition of modeldeploy's own registry."""
    refresh_gauges(_runtime(request))
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
