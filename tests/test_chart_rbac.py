"""The chart's RBAC is derived from what the operator really calls, not from a guess.

The real operator (in-process, tests/kube) runs against the strict API emulator
through a ModelDeployment's whole life: create (Deployment, Service, created PVC,
PodMonitor with the Prometheus Operator's CRD present), hand edits of the children
that it must revert, a spec change, a scale via the scale subresource, deletion.
Every request it sent is mapped to an RBAC verb on a resource the way
kube-apiserver's authorizer does, and must be allowed by the Role the chart renders
for a watched namespace; and every rule the chart grants must have been used, so the
Role is exactly what the operator needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kmock
import pytest
from kube.cluster import MD, Cluster, running_cluster, wait_for
from kube.operator_runner import OperatorRunner
from test_chart import by_kind, render

NAMESPACE = "default"
#: Non-resource URLs every authenticated client may read (the system:discovery role).
_DISCOVERY = ("/api", "/apis", "/version", "/openapi")


def _rbac_verb(request: Any) -> str:
    """The authorizer's verb for one API request."""
    method = str(request.method.value if hasattr(request.method, "value") else request.method)
    method = method.upper()
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if str(request.params.get("watch", "")).lower() in ("1", "true") else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if request.name else "deletecollection",
    }[method]


def _granted(tmp_path: Path, cluster_wide: bool) -> set[tuple[str, str, str]]:
    """The rules the chart binds to the operator: a ClusterRole, or the watched namespace's Role."""
    if cluster_wide:
        [role] = by_kind(render(tmp_path), "ClusterRole")
    else:
        [role] = by_kind(render(tmp_path, {"watchNamespaces": [NAMESPACE]}), "Role")
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _used(cluster: Cluster) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of every request the operator sent."""
    assert cluster.emulator is not None
    requests = cluster.call(lambda: list(cluster.emulator))
    used = set()
    for request in requests:
        agent = {k.lower(): v for k, v in request.headers.items()}.get("user-agent", "")
        if agent.startswith("python-httpx"):
            continue  # the test's own client (playing kubectl), not the operator
        if request.resource is None or request.resource.plural is None:
            assert str(request.url.path).startswith(_DISCOVERY), request.url
            continue  # API discovery: no rule needed
        resource = request.resource.plural
        if request.subresource:
            resource = f"{resource}/{request.subresource}"
        used.add((request.resource.group or "", resource, _rbac_verb(request)))
    return used


def _life_of_a_modeldeployment(cluster: Cluster) -> None:
    cluster.create(
        MD,
        {
            "apiVersion": "modeldeploy.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "rbac", "namespace": NAMESPACE},
            "spec": {
                "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
                "storage": {"create": {"size": "2Gi"}},
                "monitoring": {"podMonitor": True},
            },
        },
    )
    deployments = kmock.resource("apps", "v1", "deployments")
    wait_for(
        lambda: cluster.get_or_none(deployments, NAMESPACE, "rbac"),
        timeout=30,
        what="the Deployment",
    )
    wait_for(
        lambda: (cluster.get(MD, NAMESPACE, "rbac").get("status") or {}).get("phase"),
        timeout=30,
        what="a phase",
    )
    # Someone edits the children by hand: the operator puts them back (PUT).
    children = {
        kmock.resource("", "v1", "services"): "rbac",
        kmock.resource("", "v1", "persistentvolumeclaims"): "rbac-models",
        kmock.resource("monitoring.coreos.com", "v1", "podmonitors"): "rbac",
    }
    tampered = {"metadata": {"labels": {"app.kubernetes.io/part-of": "tampered"}}}
    for res, name in children.items():
        wait_for(lambda r=res, n=name: cluster.get_or_none(r, NAMESPACE, n), what=name)
        cluster.patch(res, NAMESPACE, name, tampered)
    for res, name in children.items():
        wait_for(
            lambda r=res, n=name: (
                cluster.get(r, NAMESPACE, n)["metadata"]["labels"]["app.kubernetes.io/part-of"]
                != "tampered"
            ),
            timeout=30,
            what=f"the operator to restore {res.plural}/{name}",
        )
    # A spec change the children must follow (the operator replaces them).
    cluster.patch(MD, NAMESPACE, "rbac", {"spec": {"server": {"maxConcurrent": 3}}})
    cluster.patch(MD, NAMESPACE, "rbac", {"spec": {"replicas": 2}}, sub="scale")
    wait_for(
        lambda: cluster.get(deployments, NAMESPACE, "rbac")["spec"]["replicas"] == 2,
        timeout=30,
        what="the Deployment to follow the scale",
    )
    cluster.delete(MD, NAMESPACE, "rbac")
    wait_for(
        lambda: cluster.get_or_none(MD, NAMESPACE, "rbac") is None,
        timeout=30,
        what="the ModelDeployment to go",
    )


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["watchNamespaces", "all-namespaces"])
def test_chart_role_is_exactly_what_the_operator_calls(tmp_path: Path, cluster_wide: bool) -> None:
    granted = _granted(tmp_path, cluster_wide)
    with running_cluster(podmonitor_crd=True) as cluster:
        with OperatorRunner(cluster.url, None if cluster_wide else [NAMESPACE], interval=0.5):
            _life_of_a_modeldeployment(cluster)
        operator_used = _used(cluster)
    assert operator_used <= granted, f"the chart misses {sorted(operator_used - granted)}"
    assert granted <= operator_used, f"the chart grants unused {sorted(granted - operator_used)}"
