"""Every dashboard query returns data from a real Prometheus scraping real processes.

A real `modeldeploy serve` on a tiny model and a real `modeldeploy operator` (against
the strict API emulator of tests/kube, reconciling one ModelDeployment every second)
are scraped every second by Debian's `prometheus` on 127.0.0.1, while the test sends
completions (plain and streamed), a bad request and a request for an unknown model.
Then each variable of each dashboard is resolved through Prometheus' label API, and
each panel's PromQL, with the variables substituted both as "All" and as the concrete
values, goes through the query API: no error, no warning, at least one series with a
finite value. `promtool check metrics` lints both expositions.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kube.cluster import MD, Cluster, running_cluster, wait_for
from prometheus_harness import Prometheus, Target, free_port, http_get, promtool_check_metrics
from serve_process import ServerProcess
from test_dashboards import load, panel_queries, query_variables, substitute

pytestmark = pytest.mark.slow

SERVED_NAME = "tiny"
SERVER_LABELS = {"namespace": "md-test", "pod": "tiny-7d9f-abcde"}
OPERATOR_LABELS = {"namespace": "modeldeploy-system", "pod": "modeldeploy-6c5b-xyz12"}
#: Grafana's $__rate_interval with a 1 s scrape interval would be 4 s; a wider window
#: makes the check independent of exactly when the last request landed.
RATE_INTERVAL = "30s"
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.:-]+$")


@dataclass
class OperatorProcess:
    cluster: Cluster
    proc: subprocess.Popen[bytes]
    address: str
    log: Path


@pytest.fixture(scope="module")
def model_server(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cache = tmp_path_factory.mktemp("serve-cache")
    with ServerProcess(
        tiny_models.hf("qwen2"), "--served-model-name", SERVED_NAME, cache_root=cache
    ) as server:
        server.wait_ready(180)
        yield server


@pytest.fixture(scope="module")
def operator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """`modeldeploy operator` as a subprocess, talking to the emulator via a kubeconfig."""
    tmp = tmp_path_factory.mktemp("operator")
    with running_cluster() as cluster:
        kubeconfig = cluster.kubeconfig(tmp / "kubeconfig")
        port = free_port()
        log = tmp / "operator.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "modeldeploy.server.cli",
                    "operator",
                    "--namespace",
                    "default",
                    "--metrics-port",
                    str(port),
                    "--health-port",
                    "0",
                    "--reconcile-interval",
                    "1",
                ],
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            cluster.create(
                MD,
                {
                    "apiVersion": "modeldeploy.dev/v1alpha1",
                    "kind": "ModelDeployment",
                    "metadata": {"name": "demo", "namespace": "default"},
                    "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
                },
            )
            wait_for(
                lambda: (cluster.get(MD, "default", "demo").get("status") or {}).get("phase"),
                timeout=60,
                what=f"the operator to set a phase\n{log.read_text(errors='replace')[-3000:]}",
            )
            yield OperatorProcess(cluster, proc, f"127.0.0.1:{port}", log)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def prometheus(
    model_server: Any, operator_process: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    prom = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [
            Target("modeldeploy-server", f"127.0.0.1:{model_server.port}", SERVER_LABELS),
            Target("modeldeploy-operator", operator_process.address, OPERATOR_LABELS),
        ],
    ).start()
    try:
        for job in ("modeldeploy-server", "modeldeploy-operator"):
            prom.wait_for(f'up{{job="{job}"}} == 1')
        yield prom
    finally:
        prom.stop()


def _send_traffic(url: str, seconds: float) -> int:
    """Completions (plain and streamed) plus a 4xx or two, for `seconds`; returns the count."""
    sent = 0
    body = {"model": SERVED_NAME, "prompt": "The quick brown fox", "max_tokens": 8}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            assert client.post("/v1/completions", json=body).status_code == 200
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                assert resp.status_code == 200
                for _ in resp.iter_lines():
                    pass
            unknown = client.post("/v1/completions", json={**body, "model": "no-such-model"})
            assert unknown.status_code == 404
            bad = client.post("/v1/completions", json={**body, "max_tokens": -1})
            assert bad.status_code == 400
            sent += 4
            time.sleep(0.2)
    return sent


@pytest.fixture(scope="module")
def traffic(prometheus: Prometheus, model_server: Any) -> int:
    """Requests spread over several scrapes (a rate needs two samples that differ)."""
    sent = _send_traffic(model_server.url, 6.0)
    # Wait until Prometheus has scraped the counters after the last request.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = prometheus.query("sum(modeldeploy_requests_total)")["data"]["result"]
        if result and float(result[0]["value"][1]) >= sent:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Prometheus never saw the {sent} requests sent")
    return sent


def _resolve_variables(prom: Prometheus, name: str) -> dict[str, str]:
    """Resolve each label_values() variable in order, the way Grafana does; pick the first."""
    dashboard = load(name)
    chosen: dict[str, str] = {"datasource": "prometheus"}
    for var, label, selector in query_variables(dashboard):
        params: dict[str, Any] = {}
        if selector:
            params["match[]"] = substitute(selector, chosen)
        reply = prom.api(f"label/{label}/values", **params)
        assert reply["status"] == "success", reply
        values = reply["data"]
        assert values, f"{name}: variable {var} (label_values {label}) has no values"
        assert all(_PLAIN_VALUE.match(v) for v in values), values
        chosen[var] = values[0]
    return chosen


def _check_queries(prom: Prometheus, name: str, values: dict[str, str]) -> dict[str, str]:
    """Run every panel query; return {panel: problem} for those without usable data."""
    problems: dict[str, str] = {}
    for title, expr in panel_queries(load(name)):
        promql = substitute(expr, values, RATE_INTERVAL)
        reply = prom.query(promql)
        if reply["status"] != "success" or reply.get("warnings"):
            problems[f"{title}: {promql}"] = str(reply)
            continue
        samples = [float(r["value"][1]) for r in reply["data"]["result"]]
        if not any(math.isfinite(v) for v in samples):
            problems[f"{title}: {promql}"] = f"no finite value in {reply['data']['result']}"
    return problems


def test_serving_variables_resolve_to_the_scraped_model_and_pod(
    prometheus: Prometheus, traffic: int
) -> None:
    values = _resolve_variables(prometheus, "model-serving.json")
    assert values == {
        "datasource": "prometheus",
        "namespace": SERVER_LABELS["namespace"],
        "model": SERVED_NAME,
        "pod": SERVER_LABELS["pod"],
    }


@pytest.mark.parametrize("selection", ["concrete", "all"])
def test_every_serving_panel_returns_data(
    prometheus: Prometheus, traffic: int, selection: str
) -> None:
    dashboard = load("model-serving.json")
    values = _resolve_variables(prometheus, "model-serving.json")
    if selection == "all":
        values = {**values, **{var: ".*" for var, _l, _s in query_variables(dashboard)}}
    assert _check_queries(prometheus, "model-serving.json", values) == {}


@pytest.mark.parametrize("selection", ["concrete", "all"])
def test_every_operator_panel_returns_data(
    prometheus: Prometheus, operator_process: OperatorProcess, selection: str
) -> None:
    dashboard = load("operator.json")
    # The operator re-reconciles every second: wait until two scrapes have seen it.
    prometheus.wait_for(
        f"rate(modeldeploy_operator_reconciles_total[{RATE_INTERVAL}]) > 0", timeout=60
    )
    values = _resolve_variables(prometheus, "operator.json")
    assert values["namespace"] == OPERATOR_LABELS["namespace"]
    assert values["pod"] == OPERATOR_LABELS["pod"]
    if selection == "all":
        values = {**values, **{var: ".*" for var, _l, _s in query_variables(dashboard)}}
    assert _check_queries(prometheus, "operator.json", values) == {}


def test_error_ratio_counts_the_client_errors_sent(prometheus: Prometheus, traffic: int) -> None:
    """The numbers are right, not just present: half the requests sent were 4xx."""
    values = _resolve_variables(prometheus, "model-serving.json")
    [four_xx] = [
        e for t, e in panel_queries(load("model-serving.json")) if t == "Error ratio" and "4.." in e
    ]
    result = prometheus.query(substitute(four_xx, values, RATE_INTERVAL))["data"]["result"]
    # the rate window holds a slice of the alternating traffic: one 4xx more or fewer
    # than half (measured 22 of 43 once, on a loaded machine)
    assert 0.3 < float(result[0]["value"][1]) < 0.7


def test_promtool_check_metrics_on_both_endpoints(
    model_server: Any, operator_process: OperatorProcess, traffic: int
) -> None:
    for url in (f"{model_server.url}/metrics", f"http://{operator_process.address}/metrics"):
        status, exposition = http_get(url)
        assert status == 200
        done = promtool_check_metrics(exposition)
        assert done.returncode == 0 and not done.stdout.strip(), (url, done.stdout, done.stderr)


def test_promtool_lint_is_live() -> None:
    """promtool reports a badly named counter (so a clean result above means something)."""
    done = promtool_check_metrics("# HELP foo A counter.\n# TYPE foo counter\nfoo 1\n")
    assert "_total" in done.stdout + done.stderr
