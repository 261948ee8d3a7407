"""Operator faults against the strict API emulator (tests/kube): a flaky API server, an operator
SIGKILLed in the middle of a reconcile, children changed by hand.

tests/test_operator.py covers restarts between reconciles and image edits/deletion of the
Deployment; here the faults land *inside* reconciles: API calls answered 500, 409 or not at all
(connection dropped, or held past the client's read timeout), and a real `modeldeploy operator`
process killed with SIGKILL while a create is in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kube import pods
from kube.cluster import MD, Cluster, wait_for
from kube.operator_runner import TEST_IMAGE, OperatorRunner
from modeldeploy.operator import kubeapi, labels, metrics

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PODS = kmock.resource("", "v1", "pods")
NAMESPACES = itertools.count(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


def manifest(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"})
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def owned(cluster: Cluster, res: kmock.resource, ns: str, name: str) -> list[dict[str, Any]]:
    return cluster.list(res, ns, labelSelector=f"{labels.INSTANCE}={name}")


def make_ready(cluster: Cluster, ns: str, name: str) -> None:
    """Play the Deployment controller and kubelet: one pod, ready."""
    deployment = cluster.get(DEPLOYMENTS, ns, name)
    pod = pods.pod_for(deployment, 0)
    cluster.create(PODS, pod)
    cluster.patch(PODS, ns, pod["metadata"]["name"], {"status": pods.ready()}, sub="status")
    status = pods.deployment_status(
        generation=deployment["metadata"]["generation"], replicas=1, ready=1
    )
    cluster.patch(DEPLOYMENTS, ns, name, {"status": status}, sub="status")


def history(cluster: Cluster, res: kmock.resource, ns: str, name: str) -> list[Any]:
    return cluster.call(lambda: list(cluster.emulator.objects[res, ns, name].history))


class Faults:
    """A reaction that fails a share of the requests it sees, then lets the rest through.

    Failures: 500, 503, 409 Conflict on writes (Status bodies, as kube-apiserver sends them), a
    dropped connection, or an answer held past the client's read timeout. Up to `budget` of
    them, at `rate`; reads include kopf's list and watch requests.
    """

    KINDS = ("500", "409", "drop", "hang")

    def __init__(
        self, budget: int, rate: float, write_rate: float, hang_s: float, seed: int = 7
    ) -> None:
        self.budget = budget
        self.rate = rate
        self.write_rate = write_rate
        self.hang_s = hang_s
        self.rng = random.Random(seed)
        self.injected: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        self.passed = 0
        self.turns: dict[tuple[str, ...], int] = {}

    async def __call__(self, request: kmock.Request) -> Any:
        if request.headers.get("User-Agent", "").startswith("python-httpx"):
            raise NotImplementedError  # the test's own client (playing kubelet): no faults
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        write = method.upper() != "GET"
        rate = self.write_rate if write else self.rate  # writes are few: fail them more often
        if sum(self.injected.values()) >= self.budget or self.rng.random() >= rate:
            self.passed += 1
            raise NotImplementedError  # fall through to the emulator's own handling
        # 409 only where kube-apiserver can send it: on writes (a conflict or an AlreadyExists)
        kinds = self.KINDS if write else ("500", "503", "drop", "hang")
        turn = self.turns[kinds] = self.turns.get(kinds, -1) + 1
        kind = kinds[turn % len(kinds)]  # every kind, in turn
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if kind == "500":
            return kmock.Response(status=500, payload=_status(500, "InternalError", "injected"))
        if kind == "503":
            return kmock.Response(
                status=503, payload=_status(503, "ServiceUnavailable", "injected")
            )
        if kind == "409":
            return kmock.Response(status=409, payload=_status(409, "Conflict", "injected"))
        if kind == "drop":
            transport = request._raw_request.transport  # type: ignore[union-attr]
            if transport is not None:
                transport.close()
            return kmock.Response(status=500, payload=b"")
        await asyncio.sleep(self.hang_s)  # the client gave up long ago
        return kmock.Response(status=504, payload=_status(504, "Timeout", "injected"))


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}  # fmt: skip


def test_api_errors_and_timeouts_on_some_calls_converge(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind of call the reconcile makes (reads, creates, updates, the status patch,
    the pod list) fails at random until the fault budget is spent; the end state is exact."""
    monkeypatch.setattr(kubeapi, "REQUEST_TIMEOUT", (2.0, 1.5))
    ns = f"flaky{next(NAMESPACES)}"
    faults = Faults(budget=20, rate=0.3, write_rate=0.6, hang_s=3.0)
    selected = [cluster.emulator[res] for res in (DEPLOYMENTS, SERVICES, PODS)] + [
        cluster.emulator[MD, kmock.subresource("status")],
        cluster.emulator["get", MD],
    ]
    reactions = [cluster.call(lambda view=view: view[kmock.namespace(ns)] << faults)
                 for view in selected]  # fmt: skip
    retries_before = _retries()
    runner = OperatorRunner(cluster.url, [ns], interval=1.0).start()
    try:
        started = time.monotonic()
        cluster.create(MD, manifest("flaky", ns, replicas=1))
        wait_for(lambda: cluster.get_or_none(DEPLOYMENTS, ns, "flaky"), timeout=90)
        make_ready(cluster, ns, "flaky")
        wait_for(
            lambda: (cluster.get(MD, ns, "flaky").get("status") or {}).get("phase") == "Ready",
            timeout=90,
            what="phase Ready through the faults",
        )
        converged = time.monotonic() - started
    finally:
        runner.stop()
        for reaction in reactions:
            cluster.call(lambda r=reaction: r._disabled.set())
    status = cluster.get(MD, ns, "flaky")["status"]
    assert status["readyReplicas"] == 1 and status["observedGeneration"] == 1
    for res in (DEPLOYMENTS, SERVICES):
        [child] = owned(cluster, res, ns, "flaky")
        assert child["metadata"]["ownerReferences"][0]["name"] == "flaky"
    assert [v is None for v in history(cluster, DEPLOYMENTS, ns, "flaky")].count(True) == 0
    assert sum(faults.injected.values()) >= 8, faults.injected
    assert _retries() > retries_before
    print(
        f"\nflaky API: injected {faults.injected} ({faults.passed} calls let through), "
        f"converged to Ready {converged:.1f}s after the create"
    )


def _retries() -> float:
    return sum(
        s.value
        for family in metrics.RECONCILES.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels.get("result") == "retry"
    )


def test_an_operator_sigkilled_mid_reconcile_converges_on_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A real `modeldeploy operator` process is SIGKILLed while its Service create hangs in the
    API server (the Deployment already exists); a new process converges with exactly one of
    each child, the Deployment never deleted and re-created."""
    ns = f"killed{next(NAMESPACES)}"
    hit = threading.Event()
    release = asyncio.Event()

    async def stall(request: kmock.Request) -> Any:
        if release.is_set():
            raise NotImplementedError
        hit.set()
        await asyncio.sleep(60)
        raise NotImplementedError

    reaction = cluster.call(
        lambda: cluster.emulator["post", SERVICES, kmock.namespace(ns)] << stall
    )
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig(tmp_path / "kubeconfig", ns))}
    command = [sys.executable, "-m", "modeldeploy.server.cli", "operator", "--namespace", ns,
               "--health-port", str(_free_port()), "--metrics-port", str(_free_port()),
               "--server-image", TEST_IMAGE]  # fmt: skip
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    second = None
    try:
        cluster.create(MD, manifest("interrupted", ns, storage={"create": {"size": "1Gi"}}))
        assert hit.wait(60), "the reconcile never reached the Service create"
        assert cluster.get_or_none(DEPLOYMENTS, ns, "interrupted") is not None
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        cluster.call(release.set)
        second = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        wait_for(lambda: cluster.get_or_none(SERVICES, ns, "interrupted"), timeout=60)
        wait_for(
            lambda: (cluster.get(MD, ns, "interrupted").get("status") or {}).get("phase"),
            timeout=60,
            what="a status from the new process",
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        cluster.call(lambda: reaction._disabled.set())
    pvcs = kmock.resource("", "v1", "persistentvolumeclaims")
    for res in (DEPLOYMENTS, SERVICES, pvcs):
        assert len(owned(cluster, res, ns, "interrupted")) == 1, res.plural
    assert [v is None for v in history(cluster, DEPLOYMENTS, ns, "interrupted")].count(True) == 0
    md = cluster.get(MD, ns, "interrupted")
    assert md["status"]["observedGeneration"] == 1
    assert "modeldeploy.dev/finalizer" in md["metadata"]["finalizers"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_children_changed_by_hand_are_restored(cluster: Cluster) -> None:
    """Beyond test_operator.py's image edit and deletion: scaled by hand, ownerReference and
    selector labels stripped, the Service's port changed, the Service deleted."""
    ns = f"hand{next(NAMESPACES)}"
    runner = OperatorRunner(cluster.url, [ns], interval=1.0).start()
    try:
        cluster.create(MD, manifest("edited", ns, replicas=2))
        wait_for(lambda: cluster.get_or_none(SERVICES, ns, "edited"))
        want_deployment = cluster.get(DEPLOYMENTS, ns, "edited")
        want_service = cluster.get(SERVICES, ns, "edited")
        cluster.patch(DEPLOYMENTS, ns, "edited", {"spec": {"replicas": 7}})
        wait_for(
            lambda: cluster.get(DEPLOYMENTS, ns, "edited")["spec"]["replicas"] == 2,
            what="replicas back to 2",
        )
        cluster.patch(
            DEPLOYMENTS, ns, "edited",
            [{"op": "remove", "path": "/metadata/ownerReferences"},
             {"op": "remove", "path": "/spec/template/metadata/labels"}],
            content_type="application/json-patch+json",
        )  # fmt: skip

        def restored() -> bool:
            got = cluster.get(DEPLOYMENTS, ns, "edited")
            return (
                got["metadata"].get("ownerReferences")
                == want_deployment["metadata"]["ownerReferences"]
                and got["spec"]["template"]["metadata"].get("labels")
                == want_deployment["spec"]["template"]["metadata"]["labels"]
            )

        wait_for(restored, what="ownerReferences and pod labels back")
        cluster.patch(
            SERVICES, ns, "edited",
            [{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}],
            content_type="application/json-patch+json",
        )  # fmt: skip
        wait_for(
            lambda: cluster.get(SERVICES, ns, "edited")["spec"]["ports"][0]["port"] == 80,
            what="Service port back to 80",
        )
        cluster.delete(SERVICES, ns, "edited")
        wait_for(lambda: cluster.get_or_none(SERVICES, ns, "edited"), what="Service re-created")
    finally:
        runner.stop()
    assert cluster.get(SERVICES, ns, "edited")["spec"]["ports"] == want_service["spec"]["ports"]
    assert len(owned(cluster, DEPLOYMENTS, ns, "edited")) == 1


def test_every_call_made_under_these_faults_is_granted_by_the_chart(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Least privilege under faults: retries, restarts and repairs (this module's tests, run
    before this one on the same emulator) use no verb the chart's namespaced Role lacks.
    tests/test_chart_rbac.py shows the converse (every granted rule is used)."""
    from test_chart_rbac import _granted, _used

    ns = f"rbac{next(NAMESPACES)}"
    with OperatorRunner(cluster.url, [ns], interval=1.0):
        cluster.create(MD, manifest("rbac", ns))
        wait_for(lambda: (cluster.get(MD, ns, "rbac").get("status") or {}).get("phase"))
    used = _used(cluster)
    granted = _granted(tmp_path, cluster_wide=False)
    assert used <= granted, f"not granted by the chart: {sorted(used - granted)}"
    print(f"\noperator calls under faults: {len(used)} (group, resource, verb) rules, all granted")
