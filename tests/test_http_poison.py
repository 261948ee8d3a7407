"""A device error poisons the model: liveness fails so the kubelet restarts the container.

In-process (the app and a real tiny engine in this interpreter) because the fault is
injected through the engine's test hook, `Engine.inject_fault()`, which no HTTP route
exposes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from modeldeploy.server.http.app import create_app
from modeldeploy.server.http.loader import load_model
from modeldeploy.server.http.runtime import ServerRuntime
from modeldeploy.server.http.settings import ServeSettings
from modeldeploy.server.http.state import Phase


@pytest.fixture
def loaded(tiny_models, tmp_path: Path) -> Iterator[tuple[TestClient, ServerRuntime]]:
    settings = ServeSettings(
        source=str(tiny_models.gguf("llama", "F32")),
        served_model_name="tiny",
        slug_root=tmp_path / "slugs",
        max_concurrent=2,
    )
    runtime = ServerRuntime(settings)
    failures: list[str] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await load_model(runtime, on_failure=lambda: failures.append("failed"))
        yield
        if runtime.engine is not None:
            runtime.engine.close()

    with TestClient(create_app(runtime, lifespan=lifespan)) as client:
        assert not failures, runtime.lifecycle.snapshot()
        assert runtime.lifecycle.phase is Phase.READY
        yield client, runtime


def test_device_error_poisons_health_ready_models_and_requests(loaded) -> None:
    client, runtime = loaded
    body = {"prompt": "hello", "max_tokens": 4}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.get("/health").status_code == 200

    runtime.engine.inject_fault()
    failed = client.post("/v1/completions", json=body)
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "model_poisoned"

    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "poisoned"
    ready = client.get("/ready")
    assert ready.status_code == 503 and "poisoned" in ready.json()["reason"]
    model = client.get("/models").json()["data"][0]
    assert model["status"] == "poisoned" and model["reason"]
    again = client.post("/v1/completions", json=body)
    assert again.status_code == 503 and again.json()["error"]["code"] == "model_poisoned"
    assert 'modeldeploy_model_poisoned{model="tiny"} 1.0' in client.get("/metrics").text
