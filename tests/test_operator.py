"""The operator end to end against the strict API emulator.

The real operator (kopf handlers, builders, status) runs in-process; the test
plays the Deployment controller and the kubelet by creating pods and writing
their status, and asserts what a user sees: children with owner references,
`status` moving through the phases with the failure's own message, Events,
the scale subresource, restarts without duplicates, and clean deletion.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kmock
import pytest
from kube import pods
from kube.cluster import MD, PODMONITORS, Cluster, wait_for
from kube.operator_runner import TEST_IMAGE, OperatorRunner
from modeldeploy.operator import labels, metrics

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PVCS = kmock.resource("", "v1", "persistentvolumeclaims")
PODS = kmock.resource("", "v1", "pods")
NAMESPACES = itertools.count(1)
TIMEOUT = 20.0


@dataclass
class Env:
    cluster: Cluster
    ns: str
    operator: OperatorRunner

    def restart(self) -> None:
        self.operator.stop()
        self.operator = OperatorRunner(self.cluster.url, [self.ns]).start()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


@pytest.fixture
def env(cluster: Cluster) -> Iterator[Env]:
    ns = f"t{next(NAMESPACES)}"
    runner = OperatorRunner(cluster.url, [ns]).start()
    environment = Env(cluster, ns, runner)
    try:
        yield environment
    finally:
        environment.operator.stop()


def manifest(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"})
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def wait_status(
    env: Env, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        current = env.cluster.get(MD, env.ns, name).get("status") or {}
        return current if check(current) else None

    return wait_for(probe, timeout=TIMEOUT, what=what)


def wait_phase(env: Env, name: str, phase: str) -> dict[str, Any]:
    return wait_status(env, name, lambda s: s.get("phase") == phase, f"phase {phase}")


def set_pod(env: Env, pod: dict[str, Any], status: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]
    if env.cluster.get_or_none(PODS, env.ns, name) is None:
        env.cluster.create(PODS, pod)
    env.cluster.patch(PODS, env.ns, name, {"status": status}, sub="status")


def set_deployment(env: Env, name: str, **counts: int) -> None:
    deployment = env.cluster.get(DEPLOYMENTS, env.ns, name)
    status = pods.deployment_status(generation=deployment["metadata"]["generation"], **counts)
    env.cluster.patch(DEPLOYMENTS, env.ns, name, {"status": status}, sub="status")


def events(env: Env, name: str) -> list[dict[str, Any]]:
    return env.cluster.events(env.ns, name)


def event_reasons(env: Env, name: str) -> list[str]:
    return [e["reason"] for e in events(env, name)]


def owned(env: Env, res: kmock.resource, name: str) -> list[dict[str, Any]]:
    selector = f"{labels.INSTANCE}={name}"
    return env.cluster.list(res, env.ns, labelSelector=selector)


def _with_annotations(env: Env, name: str) -> dict[str, Any] | None:
    stored = env.cluster.get(MD, env.ns, name)
    return stored if stored["metadata"].get("annotations") else None


def test_lifecycle_pending_to_failed_with_events_and_scale(env: Env) -> None:
    created = env.cluster.create(MD, manifest("demo", env.ns))
    uid = created["metadata"]["uid"]

    deployment = wait_for(lambda: env.cluster.get_or_none(DEPLOYMENTS, env.ns, "demo"))
    service = wait_for(lambda: env.cluster.get_or_none(SERVICES, env.ns, "demo"))
    for child in (deployment, service):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "ModelDeployment",
            "demo",
            uid,
            True,
        )
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == TEST_IMAGE
    status = wait_phase(env, "demo", "Pending")
    assert status["endpoint"] == f"http://demo.{env.ns}.svc.cluster.local"
    assert status["observedGeneration"] == 1
    assert status["slug"].startswith("qwen--qwen2.5-0.5b-instruct--main--")
    stored = wait_for(lambda: _with_annotations(env, "demo"), what="kopf's annotations")
    assert labels.FINALIZER in stored["metadata"]["finalizers"]
    assert all(k.startswith(f"{labels.DOMAIN}/") for k in stored["metadata"]["annotations"])

    first = pods.pod_for(deployment, 0)
    set_pod(env, first, pods.harvesting())
    set_deployment(env, "demo", replicas=1, ready=0)
    wait_phase(env, "demo", "Harvesting")

    set_pod(env, first, pods.loading())
    wait_phase(env, "demo", "Loading")

    set_pod(env, first, pods.ready())
    set_deployment(env, "demo", replicas=1, ready=1)
    status = wait_phase(env, "demo", "Ready")
    assert status["readyReplicas"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "False"

    # kubectl scale md/demo --replicas=2 goes through the scale subresource.
    scale = env.cluster.get(MD, env.ns, "demo", sub="scale")
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == labels.selector_string("demo")
    env.cluster.patch(MD, env.ns, "demo", {"spec": {"replicas": 2}}, sub="scale")
    wait_for(
        lambda: env.cluster.get(DEPLOYMENTS, env.ns, "demo")["spec"]["replicas"] == 2,
        what="the Deployment to follow the scale",
    )
    second = pods.pod_for(deployment, 1)
    set_pod(env, second, pods.loading())
    set_deployment(env, "demo", replicas=2, ready=1)
    status = wait_status(
        env, "demo", lambda s: s.get("phase") == "Degraded" and s.get("replicas") == 2, "2 pods"
    )
    assert status["message"] == "1/2 replicas ready"
    assert status["observedGeneration"] == 2
    assert env.cluster.get(MD, env.ns, "demo", sub="scale")["status"]["replicas"] == 2

    crash = "server: failed to load /models/hub/model.safetensors: header is truncated"
    set_pod(env, first, pods.server_crashloop(crash.removeprefix("server: ")))
    set_pod(env, second, pods.server_crashloop(crash.removeprefix("server: ")))
    set_deployment(env, "demo", replicas=2, ready=0)
    status = wait_phase(env, "demo", "Failed")
    assert status["message"] == crash
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["reason"] == "CrashLoopBackOff"
    assert conditions["Degraded"]["message"] == crash

    wait_for(lambda: "Failed" in event_reasons(env, "demo"), what="a Failed event")
    failed = [e for e in events(env, "demo") if e["reason"] == "Failed"]
    assert failed[0]["type"] == "Warning"
    assert failed[0]["message"] == crash
    assert failed[0]["involvedObject"]["uid"] == uid
    reasons = event_reasons(env, "demo")
    phases = ["Pending", "Harvesting", "Loading", "Ready", "Degraded", "Failed"]
    transitions = [r for i, r in enumerate(reasons) if r in phases and reasons[i - 1 : i] != [r]]
    assert transitions == phases, reasons
    degraded = [e["message"] for e in events(env, "demo") if e["reason"] == "Degraded"]
    assert degraded[0] == "1/2 replicas ready"
    assert all(e == degraded[0] or crash in e for e in degraded), "a new failure is an event too"


def test_harvest_failure_reaches_status_and_events(env: Env) -> None:
    env.cluster.create(MD, manifest("missing", env.ns, model={"source": "hf://nobody/nothing"}))
    deployment = wait_for(lambda: env.cluster.get_or_none(DEPLOYMENTS, env.ns, "missing"))
    message = "hf://nobody/nothing: repository not found on https://huggingface.co (404)"
    set_pod(env, pods.pod_for(deployment, 0), pods.harvest_failed(message))
    set_deployment(env, "missing", replicas=1, ready=0)
    status = wait_phase(env, "missing", "Failed")
    assert status["message"] == f"harvest: {message}"
    wait_for(lambda: "Failed" in event_reasons(env, "missing"), what="a Failed event")
    (event,) = [e for e in events(env, "missing") if e["reason"] == "Failed"]
    assert message in event["message"]


def test_spec_change_updates_the_deployment_and_observed_generation(env: Env) -> None:
    env.cluster.create(MD, manifest("change", env.ns))
    before = wait_for(lambda: env.cluster.get_or_none(DEPLOYMENTS, env.ns, "change"))
    wait_status(env, "change", lambda s: s.get("observedGeneration") == 1, "generation 1")
    env.cluster.patch(MD, env.ns, "change", {"spec": {"server": {"maxConcurrent": 3}}})

    def updated() -> dict[str, Any] | None:
        deployment = env.cluster.get(DEPLOYMENTS, env.ns, "change")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return deployment if "3" in args[args.index("--max-concurrent") + 1 :][:1] else None

    after = wait_for(updated, what="the new --max-concurrent")
    assert (
        after["spec"]["template"]["metadata"]["annotations"][labels.TEMPLATE_HASH]
        != before["spec"]["template"]["metadata"]["annotations"][labels.TEMPLATE_HASH]
    ), "the pod template hash changes, so the pods roll"
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "updated in place"
    wait_status(env, "change", lambda s: s.get("observedGeneration") == 2, "generation 2")


def test_restarted_operator_converges_without_duplicates(env: Env) -> None:
    env.cluster.create(MD, manifest("steady", env.ns))
    wait_for(lambda: env.cluster.get_or_none(SERVICES, env.ns, "steady"))
    wait_phase(env, "steady", "Pending")

    env.operator.stop()
    # While the operator is down: a spec change, a lost child and a new object.
    env.cluster.patch(MD, env.ns, "steady", {"spec": {"replicas": 3}})
    env.cluster.delete(SERVICES, env.ns, "steady")
    env.cluster.create(MD, manifest("latecomer", env.ns, storage={"create": {"size": "1Gi"}}))
    env.restart()

    wait_for(lambda: env.cluster.get_or_none(SERVICES, env.ns, "steady"), what="Service back")
    wait_for(
        lambda: env.cluster.get(DEPLOYMENTS, env.ns, "steady")["spec"]["replicas"] == 3,
        what="replicas 3",
    )
    wait_status(env, "steady", lambda s: s.get("observedGeneration") == 2, "generation 2")
    wait_for(lambda: env.cluster.get_or_none(PVCS, env.ns, "latecomer-models"), what="the PVC")
    wait_phase(env, "latecomer", "Pending")
    env.restart()  # once more: a resume must not create anything new
    wait_phase(env, "latecomer", "Pending")
    for name, kinds in (
        ("steady", (DEPLOYMENTS, SERVICES)),
        ("latecomer", (DEPLOYMENTS, SERVICES, PVCS)),
    ):
        for res in kinds:
            assert len(owned(env, res, name)) == 1, (name, res.plural)
    history = env.cluster.call(
        lambda: env.cluster.emulator.objects[DEPLOYMENTS, env.ns, "latecomer"].history
    )
    assert [v is None for v in history].count(True) == 0, "never deleted and recreated"


def test_hand_edits_of_children_are_undone(env: Env) -> None:
    env.cluster.create(MD, manifest("guarded", env.ns))
    wait_for(lambda: env.cluster.get_or_none(DEPLOYMENTS, env.ns, "guarded"))
    env.cluster.patch(
        DEPLOYMENTS,
        env.ns,
        "guarded",
        [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"}],
        content_type="application/json-patch+json",
    )
    wait_for(
        lambda: (
            env.cluster.get(DEPLOYMENTS, env.ns, "guarded")["spec"]["template"]["spec"][
                "containers"
            ][0]["image"]
            == TEST_IMAGE
        ),
        what="the image restored",
    )
    env.cluster.delete(DEPLOYMENTS, env.ns, "guarded")
    wait_for(lambda: env.cluster.get_or_none(DEPLOYMENTS, env.ns, "guarded"), what="recreated")


def test_delete_removes_the_finalizer_and_the_children(env: Env) -> None:
    env.cluster.create(MD, manifest("doomed", env.ns, storage={"create": {"size": "1Gi"}}))
    wait_for(lambda: env.cluster.get_or_none(PVCS, env.ns, "doomed-models"))
    wait_for(
        lambda: (
            labels.FINALIZER
            in (env.cluster.get(MD, env.ns, "doomed")["metadata"].get("finalizers") or [])
        )
    )
    env.cluster.delete(MD, env.ns, "doomed")
    wait_for(lambda: env.cluster.get_or_none(MD, env.ns, "doomed") is None, what="CR gone")
    for res in (DEPLOYMENTS, SERVICES, PVCS):
        assert owned(env, res, "doomed") == [], res.plural
    last = env.cluster.call(lambda: env.cluster.emulator.objects[MD, env.ns, "doomed"].history[-2])
    assert last["metadata"]["deletionTimestamp"]
    assert labels.FINALIZER not in (last["metadata"].get("finalizers") or [])


def test_podmonitor_without_its_crd_is_a_warning_event(env: Env) -> None:
    env.cluster.create(MD, manifest("watched", env.ns, monitoring={"podMonitor": True}))
    wait_for(lambda: "PodMonitorUnavailable" in event_reasons(env, "watched"))
    (event,) = [e for e in events(env, "watched") if e["reason"] == "PodMonitorUnavailable"]
    assert event["type"] == "Warning"
    assert "PodMonitor CRD" in event["message"]
    wait_phase(env, "watched", "Pending")  # not a failure


def test_podmonitor_is_created_when_its_crd_exists() -> None:
    with Cluster(podmonitor_crd=True) as cluster, OperatorRunner(cluster.url, ["mon"]):
        cluster.create(MD, manifest("watched", "mon", monitoring={"podMonitor": True}))
        monitor = wait_for(lambda: cluster.get_or_none(PODMONITORS, "mon", "watched"))
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
        assert monitor["metadata"]["ownerReferences"][0]["name"] == "watched"


def test_a_spec_the_operator_cannot_build_is_failed_naming_the_field(env: Env) -> None:
    # The CRD's pattern lets this through; the source parser refuses ".." in a revision.
    source = "hf://org/repo@v..1"
    env.cluster.create(MD, manifest("unbuildable", env.ns, model={"source": source}))
    status = wait_phase(env, "unbuildable", "Failed")
    assert status["message"].startswith("spec.model.source:")
    assert source in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["reason"] == "InvalidSpec"
    wait_for(lambda: "Failed" in event_reasons(env, "unbuildable"))
    assert env.cluster.get_or_none(DEPLOYMENTS, env.ns, "unbuildable") is None


def test_metrics_count_reconciles_and_phases(env: Env) -> None:
    before = metrics.REGISTRY.get_sample_value(
        "modeldeploy_operator_reconciles_total", {"handler": "create", "result": "success"}
    )
    env.cluster.create(MD, manifest("counted", env.ns))
    wait_phase(env, "counted", "Pending")
    wait_for(
        lambda: (
            metrics.REGISTRY.get_sample_value(
                "modeldeploy_operator_reconciles_total", {"handler": "create", "result": "success"}
            )
            >= (before or 0) + 1
        ),
        what="the create reconcile counted",
    )
    assert metrics.REGISTRY.get_sample_value(
        "modeldeploy_operator_reconcile_duration_seconds_count", {"handler": "create"}
    )
    pending = metrics.REGISTRY.get_sample_value(
        "modeldeploy_operator_modeldeployments", {"phase": "Pending"}
    )
    assert pending >= 1
