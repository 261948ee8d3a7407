"""`modeldeploy serve` as Kubernetes sees it: probes while loading, failures, timeouts, drain.

Real processes and real signals. The slow load uses the test-only hook
MODELDEPLOY_TEST_LOAD_DELAY (seconds held in the `loading` phase).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_process import ServerProcess

LOAD_DELAY_S = 3.0
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def _poll_until_ready(proc: ServerProcess, timeout: float = 120) -> list[tuple[str, int, dict]]:
    """Every /health and /ready answer from the port opening until ready (the probe's view)."""
    proc.wait_listening()
    seen: list[tuple[str, int, dict]] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=proc.url, timeout=10) as http:
        while time.monotonic() < deadline:
            for path in ("/health", "/ready"):
                response = http.get(path)
                seen.append((path, response.status_code, response.json()))
            if seen[-1][1] == 200:
                return seen
            if seen[-1][2].get("status") == "failed":
                raise AssertionError(f"load failed: {seen[-1]}\n{proc.log_tail()}")
            time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout}s:\n{proc.log_tail()}")


@pytest.fixture(scope="module")
def slow_server(tiny_models, tmp_path_factory) -> Iterator[tuple[ServerProcess, list]]:
    root = tmp_path_factory.mktemp("slow")
    proc = ServerProcess(
        tiny_models.gguf("llama", "Q8_0"),
        "--no-cors",
        "--no-metrics",
        "--drain-timeout", "60",
        env={"MODELDEPLOY_TEST_LOAD_DELAY": str(LOAD_DELAY_S)},
        cache_root=root / "cache",
    )  # fmt: skip
    try:
        yield proc, _poll_until_ready(proc)
    finally:
        proc.stop()


def test_ready_is_503_with_progress_while_loading_and_health_stays_200(slow_server) -> None:
    _proc, seen = slow_server
    health = [code for path, code, _ in seen if path == "/health"]
    ready = [(code, body) for path, code, body in seen if path == "/ready"]
    assert set(health) == {200}
    assert ready[-1][0] == 200 and ready[-1][1]["status"] == "ready"
    loading = [body for code, body in ready if code == 503 and body["status"] == "loading"]
    assert len(loading) >= 5, ready  # the delay holds 'loading' for seconds
    with_progress = [b for b in loading if b.get("progress")]
    assert with_progress, loading
    progress = with_progress[-1]["progress"]
    assert 0 <= progress["done"] <= progress["total"] and progress["unit"]
    assert {code for code, _ in ready[:-1]} == {503}
    statuses = [body["status"] for _, body in ready]
    order = ["harvesting", "loading", "warming", "ready"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)


def test_no_metrics_and_no_cors(slow_server) -> None:
    proc, _ = slow_server
    with httpx.Client(base_url=proc.url, timeout=10) as http:
        assert http.get("/metrics").status_code == 404
        response = http.get("/v1/models", headers={"Origin": "https://app.example"})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        assert "/metrics" not in http.get("/openapi.json").json()["paths"]


def _stream(url: str, max_tokens: int, started: threading.Event | None = None) -> dict:
    """One streamed chat completion; returns its text, finish reason, usage and [DONE]."""
    body = {
        "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    out: dict = {"text": "", "finish": None, "usage": None, "done": False, "errors": []}
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        out["status"] = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out["errors"].append(chunk["error"])
                continue
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            for choice in chunk.get("choices", []):
                out["text"] += choice["delta"].get("content") or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
                if started is not None and out["text"]:
                    started.set()
    return out


def test_sigterm_drains_four_streams_refuses_new_work_and_exits_0(slow_server) -> None:
    proc, _ = slow_server
    max_tokens = 60
    started = [threading.Event() for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_stream, proc.url, max_tokens, ev) for ev in started]
        for ev in started:
            assert ev.wait(60), proc.log_tail()
        proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            ready = http.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = http.post("/v1/chat/completions", json={"messages": MESSAGES})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            assert http.get("/health").status_code == 200  # draining is not dead
        results = [f.result(timeout=120) for f in futures]
    for result in results:
        assert result["status"] == 200 and result["errors"] == []
        assert result["done"] and result["finish"] == "length"
        assert result["usage"]["completion_tokens"] == max_tokens
    assert proc.wait_exit(timeout=60) == 0
    assert time.monotonic() - signalled < 60
    messages = [r.get("msg") for r in proc.records()]
    assert "draining" in messages and "drained" in messages


# ---- failures: /ready says why, the termination log has it, exit code says bad input ----


def _failed_run(source: Path | str, tmp_path: Path) -> tuple[dict, int, str]:
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    proc = ServerProcess(
        source,
        env={"MODELDEPLOY_TERMINATION_LOG": str(termination_log)},
        cache_root=tmp_path / "cache",
    )
    try:
        proc.wait_listening()
        failed: dict = {}
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            while proc.proc.poll() is None and not failed:
                try:
                    response = http.get("/ready")
                except httpx.TransportError:
                    break
                if response.json().get("status") == "failed":
                    assert response.status_code == 503
                    assert http.get("/health").status_code == 503
                    failed = response.json()
                time.sleep(0.05)
        code = proc.wait_exit(timeout=120)
    finally:
        proc.stop()
    return failed, code, termination_log.read_text()


def test_missing_model_fails_with_reason_termination_log_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    failed, code, message = _failed_run(missing, tmp_path)
    assert code == 2
    assert str(missing) in failed["reason"]
    assert message == failed["reason"]


def test_corrupt_model_fails_at_load_naming_the_file(tiny_models, tmp_path: Path) -> None:
    good = tiny_models.gguf("qwen2", "F32")
    bad = tmp_path / "model" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    failed, code, message = _failed_run(bad, tmp_path)
    assert code == 2
    assert "broken.gguf" in failed["reason"]
    assert message == failed["reason"]


# ---- --timeout -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_server(tiny_models, tmp_path_factory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("impatient")
    proc = ServerProcess(
        tiny_models.gguf("qwen2", "F32"), "--timeout", "0.3", cache_root=root / "cache"
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _engine_running(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("modeldeploy_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no modeldeploy_requests_running sample")


def _wait_engine_idle(http: httpx.Client, within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while _engine_running(http) != 0:
        assert time.monotonic() < deadline, "generation still running after the timeout"
        time.sleep(0.05)


def test_timeout_is_504_and_cancels_the_generation(impatient_server: ServerProcess) -> None:
    body = {"prompt": "Long story:", "max_tokens": 480, "ignore_eos": True}
    with httpx.Client(base_url=impatient_server.url, timeout=30) as http:
        started = time.monotonic()
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 5
        error = response.json()["error"]
        assert error["code"] == "timeout" and "--timeout" in error["message"]
        _wait_engine_idle(http)


def test_stream_timeout_ends_with_an_error_event(impatient_server: ServerProcess) -> None:
    body = {"prompt": "Long story:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=impatient_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 504:  # the deadline passed before the first token
                return
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "timeout"
        _wait_engine_idle(http)
