"""The strict API emulator behaves like kube-apiserver where operators and kubectl rely on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import kmock
import pytest
from kube.cluster import MD, ApiStatusError, Cluster, resource_path

CONFIGMAPS = kmock.resource("", "v1", "configmaps")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


def md(name: str, ns: str = "emu", **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"source": "hf://a/b"})
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def test_create_stamps_metadata_and_refuses_duplicates(cluster: Cluster) -> None:
    first = cluster.create(MD, md("one"))
    meta = first["metadata"]
    assert meta["namespace"] == "emu"
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    second = cluster.create(MD, md("two"))
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    with pytest.raises(ApiStatusError) as duplicate:
        cluster.create(MD, md("one"))
    assert (duplicate.value.status, duplicate.value.body["reason"]) == (409, "AlreadyExists")
    with pytest.raises(ApiStatusError) as missing:
        cluster.get(MD, "emu", "nobody")
    assert (missing.value.status, missing.value.body["reason"]) == (404, "NotFound")
    generated = cluster.create(
        CONFIGMAPS, {"metadata": {"generateName": "cfg-", "namespace": "emu"}, "data": {}}
    )
    assert generated["metadata"]["name"].startswith("cfg-")


def test_generation_status_split_and_noop_writes(cluster: Cluster) -> None:
    created = cluster.create(MD, {**md("gen"), "status": {"phase": "Ready"}})
    assert "status" not in created, "status is ignored on create"
    status = cluster.patch(MD, "emu", "gen", {"status": {"phase": "Loading"}}, sub="status")
    assert status["status"] == {"phase": "Loading"}
    assert status["metadata"]["generation"] == 1, "status writes keep the generation"
    main = cluster.patch(MD, "emu", "gen", {"status": {"phase": "Failed"}, "spec": {"replicas": 2}})
    assert main["status"] == {"phase": "Loading"}, "the main resource ignores status"
    assert main["metadata"]["generation"] == 2
    labelled = cluster.patch(MD, "emu", "gen", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 2, "metadata changes keep the generation"
    again = cluster.patch(MD, "emu", "gen", {"metadata": {"labels": {"a": "b"}}})
    assert again["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]
    sub = cluster.patch(MD, "emu", "gen", {"spec": {"replicas": 5}}, sub="status")
    assert sub["spec"]["replicas"] == 2, "the status subresource ignores spec"


def test_put_needs_the_current_resource_version(cluster: Cluster) -> None:
    current = cluster.create(MD, md("put"))
    stale = json.loads(json.dumps(current))
    current["spec"]["replicas"] = 3
    replaced = cluster.request("PUT", resource_path(MD, "emu", "put"), body=current)
    assert replaced["spec"]["replicas"] == 3
    stale["spec"]["replicas"] = 4
    with pytest.raises(ApiStatusError) as conflict:
        cluster.request("PUT", resource_path(MD, "emu", "put"), body=stale)
    assert (conflict.value.status, conflict.value.body["reason"]) == (409, "Conflict")


def test_failed_json_patch_test_is_422(cluster: Cluster) -> None:
    cluster.create(MD, md("jp"))
    patch = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    with pytest.raises(ApiStatusError) as failed:
        cluster.patch(MD, "emu", "jp", patch, content_type="application/json-patch+json")
    assert failed.value.status == 422
    assert "finalizers" not in cluster.get(MD, "emu", "jp")["metadata"]


def test_selectors_and_resumed_watches(cluster: Cluster) -> None:
    for name, tier in (("w1", "gold"), ("w2", "silver"), ("w3", "gold")):
        cluster.create(
            CONFIGMAPS, {"metadata": {"name": name, "namespace": "sel", "labels": {"tier": tier}}}
        )
    gold = cluster.list(CONFIGMAPS, "sel", labelSelector="tier=gold")
    assert sorted(o["metadata"]["name"] for o in gold) == ["w1", "w3"]
    assert [
        o["metadata"]["name"]
        for o in cluster.list(CONFIGMAPS, "sel", labelSelector="tier notin (gold)")
    ] == ["w2"]
    assert [
        o["metadata"]["name"]
        for o in cluster.list(CONFIGMAPS, "sel", fieldSelector="metadata.name=w2")
    ] == ["w2"]
    listing = cluster.request("GET", resource_path(CONFIGMAPS, "sel"))
    since = listing["metadata"]["resourceVersion"]
    cluster.patch(CONFIGMAPS, "sel", "w1", {"data": {"k": "v"}})
    cluster.delete(CONFIGMAPS, "sel", "w2")
    assert cluster.http is not None
    response = cluster.http.get(
        resource_path(CONFIGMAPS, "sel"),
        params={"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"},
    )
    events = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "w1"),
        ("DELETED", "w2"),
    ]


def test_finalizers_and_garbage_collection(cluster: Cluster) -> None:
    owner = cluster.create(
        MD,
        {**md("owner"), "metadata": {"name": "owner", "namespace": "gc", "finalizers": ["x/hold"]}},
    )
    ref = {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    cluster.create(
        CONFIGMAPS, {"metadata": {"name": "child", "namespace": "gc", "ownerReferences": [ref]}}
    )
    cluster.delete(MD, "gc", "owner")
    held = cluster.get(MD, "gc", "owner")
    assert held["metadata"]["deletionTimestamp"]
    assert cluster.get_or_none(CONFIGMAPS, "gc", "child") is not None
    cluster.patch(MD, "gc", "owner", {"metadata": {"finalizers": None}})
    assert cluster.get_or_none(MD, "gc", "owner") is None
    assert cluster.get_or_none(CONFIGMAPS, "gc", "child") is None, "dependents are collected"


def test_scale_subresource(cluster: Cluster) -> None:
    cluster.create(MD, md("scaled"))
    cluster.patch(MD, "emu", "scaled", {"status": {"replicas": 1, "selector": "a=b"}}, sub="status")
    scale = cluster.get(MD, "emu", "scaled", sub="scale")
    assert scale["kind"] == "Scale"
    assert (scale["spec"]["replicas"], scale["status"]) == (1, {"replicas": 1, "selector": "a=b"})
    cluster.patch(MD, "emu", "scaled", {"spec": {"replicas": 4}}, sub="scale")
    stored = cluster.get(MD, "emu", "scaled")
    assert (stored["spec"]["replicas"], stored["metadata"]["generation"]) == (4, 2)
    with pytest.raises(ApiStatusError) as refused:
        cluster.patch(MD, "emu", "scaled", {"spec": {"replicas": -1}}, sub="scale")
    assert refused.value.status == 422


def test_kubectl_table_output_has_the_printer_columns(cluster: Cluster) -> None:
    cluster.create(MD, md("tabled"))
    cluster.patch(
        MD, "emu", "tabled", {"status": {"phase": "Loading", "readyReplicas": 0}}, sub="status"
    )
    assert cluster.http is not None
    response = cluster.http.get(
        resource_path(MD, "emu"),
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"},
    )
    table = response.json()
    assert table["kind"] == "Table"
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:6] == ["Name", "Source", "Replicas", "Ready", "Phase", "Endpoint"]
    (row,) = [r for r in table["rows"] if r["cells"][0] == "tabled"]
    assert row["cells"][1:5] == ["hf://a/b", 1, 0, "Loading"]


def test_injected_errors_take_precedence_and_change_nothing(cluster: Cluster) -> None:
    cluster.create(MD, md("faulty"))
    assert cluster.emulator is not None
    emulator = cluster.emulator
    cluster.call(lambda: emulator["patch", MD, kmock.name("faulty")] << 500)
    with pytest.raises(ApiStatusError) as failed:
        cluster.patch(MD, "emu", "faulty", {"spec": {"replicas": 9}})
    assert failed.value.status == 500
    assert cluster.get(MD, "emu", "faulty")["spec"]["replicas"] == 1


def test_discovery_lists_the_crd_resource(cluster: Cluster) -> None:
    assert cluster.http is not None
    found = cluster.http.get("/apis/modeldeploy.dev/v1alpha1").json()
    by_name = {r["name"]: r for r in found["resources"]}
    assert by_name["modeldeployments"]["kind"] == "ModelDeployment"
    assert by_name["modeldeployments"]["shortNames"] == ["md"]
    assert {"modeldeployments/status", "modeldeployments/scale"} <= set(by_name)
    assert httpx.get(f"{cluster.url}/apis/monitoring.coreos.com/v1").status_code == 404
