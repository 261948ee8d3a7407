"""How a built child is reconciled with what the API server holds (no cluster needed)."""

from __future__ import annotations

import copy

from modeldeploy.operator import builders, children
from modeldeploy.operator.spec import parse_spec

SPEC = parse_spec(
    {
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "model": {"source": "hf://a/b"},
            "device": "cuda",
            "storage": {"create": {"size": "1Gi"}},
        },
    },
    default_image="img:1",
)


def _as_served(obj: dict) -> dict:
    """The object as the API server returns it: defaults added, quantities as strings."""
    served = copy.deepcopy(obj)
    served["metadata"].update(resourceVersion="7", uid="child-uid", generation=1)
    served["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
    if served["kind"] == "Deployment":
        pod = served["spec"]["template"]["spec"]
        pod["dnsPolicy"] = "ClusterFirst"
        for container in pod["initContainers"] + pod["containers"]:
            container["imagePullPolicy"] = "IfNotPresent"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    container[probe]["successThreshold"] = 1
        limits = pod["containers"][0]["resources"]["limits"]
        limits["nvidia.com/gpu"] = str(limits["nvidia.com/gpu"])
    if served["kind"] == "Service":
        served["spec"]["clusterIP"] = "10.0.0.7"
    served["status"] = {"observedGeneration": 1}
    return served


def test_server_defaults_do_not_count_as_drift() -> None:
    for child in builders.build_children(SPEC):
        assert children.desired_update(_as_served(child), child) is None, child["kind"]


def test_a_hand_edit_is_replaced_but_server_fields_survive() -> None:
    desired = builders.build_service(SPEC)
    served = _as_served(desired)
    served["spec"]["ports"][0]["port"] = 8081
    served["metadata"]["labels"]["team"] = "search"
    update = children.desired_update(served, desired)
    assert update is not None
    assert update["spec"]["ports"][0]["port"] == 80
    assert update["spec"]["clusterIP"] == "10.0.0.7", "allocated fields are kept"
    assert update["metadata"]["resourceVersion"] == "7", "the replace is conditional"
    assert update["metadata"]["labels"]["team"] == "search", "foreign labels are kept"


def test_deployment_spec_is_replaced_whole() -> None:
    desired = builders.build_deployment(SPEC)
    served = _as_served(desired)
    served["spec"]["template"]["spec"]["containers"][0]["args"].append("--evil")
    update = children.desired_update(served, desired)
    assert update["spec"] == desired["spec"]
    assert update["status"] == served["status"]


def test_claims_are_never_rewritten_but_get_adopted() -> None:
    desired = builders.build_pvc(SPEC)
    served = _as_served(desired)
    served["spec"]["resources"]["requests"]["storage"] = "5Gi"  # resized by hand: left alone
    assert children.desired_update(served, desired) is None
    served["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Other", "name": "x", "uid": "other", "controller": False}
    ]
    update = children.desired_update(served, desired)
    assert update["spec"] == served["spec"]
    uids = [o["uid"] for o in update["metadata"]["ownerReferences"]]
    assert uids == ["other", "u-1"]


def test_contains() -> None:
    assert children.contains({"a": 1, "b": [{"c": 2, "d": 3}]}, {"b": [{"c": 2}]})
    assert not children.contains({"b": [{"c": 2}, {"c": 3}]}, {"b": [{"c": 2}]})
    assert children.contains({"gpu": "1"}, {"gpu": 1})
    assert not children.contains({"flag": "True"}, {"flag": True})
