"""The ModelDeployment CRD: shape, documentation, defaults, and what `kubectl apply` refuses.

The refusals are checked with the API server's own algorithm (structural
defaults, unknown fields, OpenAPI constraints, CEL rules; see tests/kube/crd.py),
both directly and through the strict emulator's 422 answers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kube.cluster import MD, ApiStatusError, Cluster
from kube.crd import MODELDEPLOYMENT_CRD, Invalid, load_crd
from modeldeploy.operator import spec as spec_mod

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd():
    return load_crd()


def _props(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, prop in (node.get("properties") or {}).items():
        where = f"{path}.{name}" if path else name
        yield where, prop
        yield from _props(prop, where)
        if isinstance(prop.get("items"), Mapping):
            yield from _props(prop["items"], f"{where}[]")
        if isinstance(prop.get("additionalProperties"), Mapping):
            yield from _props(prop["additionalProperties"], f"{where}.*")


def test_crd_identity_subresources_and_columns(crd) -> None:
    raw = yaml.safe_load(MODELDEPLOYMENT_CRD.read_text())
    assert raw["metadata"]["name"] == "modeldeployments.modeldeploy.dev"
    assert (crd.group, crd.version, crd.kind, crd.plural) == (
        spec_mod.GROUP,
        spec_mod.VERSION,
        spec_mod.KIND,
        spec_mod.PLURAL,
    )
    assert crd.names["shortNames"] == ["md"]
    assert crd.namespaced
    assert crd.subresources["status"] == {}
    assert crd.subresources["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    default_columns = [c["name"] for c in crd.printer_columns if not c.get("priority")]
    assert default_columns == ["Source", "Replicas", "Ready", "Phase", "Age"]
    paths = {c["name"]: c["jsonPath"] for c in crd.printer_columns}
    assert paths["Source"] == ".spec.model.source"
    assert paths["Ready"] == ".status.readyReplicas"
    assert paths["Phase"] == ".status.phase"


def test_crd_is_a_valid_kubernetes_object() -> None:
    raw = yaml.safe_load(MODELDEPLOYMENT_CRD.read_text())
    kubernetes_validate.validate(raw, "1.35.0", strict=True)


def test_every_field_is_documented_and_structural(crd) -> None:
    """`kubectl explain md.spec...` has something to say about every field."""
    missing = [p for p, prop in _props(crd.schema) if not prop.get("description")]
    assert not missing, f"fields without a description: {missing}"
    untyped = [
        p
        for p, prop in _props(crd.schema)
        if "type" not in prop
        and not prop.get("x-kubernetes-int-or-string")
        and not prop.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert not untyped, f"structural schemas need a type on every field: {untyped}"


def test_defaults_in_the_crd_equal_the_operators(crd) -> None:
    """The API server and the operator must fill in the same defaults (spec.DEFAULTS)."""
    spec_schema = crd.schema["properties"]["spec"]
    for dotted, value in spec_mod.DEFAULTS.items():
        node = spec_schema
        for part in dotted.split("."):
            node = node["properties"][part]
        assert node.get("default") == value, dotted
    declared = {p for p, prop in _props(spec_schema) if "default" in prop}
    assert declared <= set(spec_mod.DEFAULTS) | {"server"}, declared - set(spec_mod.DEFAULTS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_and_parsed(crd, path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    admitted = crd.admit(manifest)
    admitted["metadata"]["namespace"] = "default"
    parsed = spec_mod.parse_spec(admitted)
    assert parsed.name == manifest["metadata"]["name"]
    assert parsed.model.source == manifest["spec"]["model"]["source"]


def test_required_examples_exist() -> None:
    sources = {yaml.safe_load(p.read_text())["spec"]["model"]["source"] for p in EXAMPLES}
    specs = [yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES]
    assert "hf://Qwen/Qwen2.5-0.5B-Instruct" in sources
    assert any(s["model"].get("quant") for s in specs)
    assert any(s.get("device") == "cuda" for s in specs)
    assert any(src.startswith("pvc://") for src in sources)
    assert any(src.startswith("file://") for src in sources)


BASE = {
    "apiVersion": "modeldeploy.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "bad", "namespace": "default"},
    "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
}

#: (id, change to the spec, the field the refusal must name)
INVALID = [
    ("typo-field", {"replica": 2}, "spec.replica"),
    (
        "typo-nested",
        {"model": {"source": "hf://a/b", "quantization": "Q4"}},
        "spec.model.quantization",
    ),
    ("bad-scheme", {"model": {"source": "s3://bucket/model"}}, "spec.model.source"),
    ("relative-path", {"model": {"source": "models/x.gguf"}}, "spec.model.source"),
    ("hf-without-repo", {"model": {"source": "hf://justorg"}}, "spec.model.source"),
    ("no-source", {"model": {"quant": "Q4"}}, "spec.model.source"),
    ("negative-replicas", {"replicas": -1}, "spec.replicas"),
    ("replicas-as-text", {"replicas": "three"}, "spec.replicas"),
    (
        "two-storage-kinds",
        {"storage": {"emptyDir": {}, "claim": {"name": "models"}}},
        "spec.storage",
    ),
    ("no-storage-kind", {"storage": {}}, "spec.storage"),
    ("create-without-size", {"storage": {"create": {}}}, "spec.storage.create.size"),
    ("port-too-low", {"server": {"port": 80}}, "spec.server.port"),
    ("port-too-high", {"server": {"port": 70000}}, "spec.server.port"),
    (
        "revision-on-file",
        {"model": {"source": "file:///m/x.gguf", "revision": "v1"}},
        "spec.model.revision",
    ),
    (
        "revision-on-pvc",
        {"model": {"source": "pvc://store/x.gguf", "revision": "v1"}},
        "spec.model.revision",
    ),
    (
        "revision-twice",
        {"model": {"source": "hf://a/b@v2", "revision": "v1"}},
        "spec.model.revision",
    ),
    ("startup-too-short", {"startupTimeoutSeconds": 10}, "spec.startupTimeoutSeconds"),
    ("startup-too-long", {"startupTimeoutSeconds": 100000}, "spec.startupTimeoutSeconds"),
    ("unknown-dtype", {"dtype": "int4"}, "spec.dtype"),
    ("unknown-device", {"device": "tpu"}, "spec.device"),
    ("quant-with-space", {"model": {"source": "hf://a/b", "quant": "Q4 K"}}, "spec.model.quant"),
    ("managed-flag", {"server": {"extraArgs": ["--port=9000"]}}, "spec.server.extraArgs"),
    (
        "managed-flag-split",
        {"server": {"extraArgs": ["--host", "1.2.3.4"]}},
        "spec.server.extraArgs",
    ),
    ("token-in-env", {"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "spec.env[0]"),
    ("env-value-and-from", {"env": [{"name": "A", "value": "1", "valueFrom": {}}]}, "spec.env[0]"),
    (
        "duplicate-env",
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        "spec.env[1]",
    ),
    ("secret-without-name", {"hfTokenSecretRef": {"key": "token"}}, "spec.hfTokenSecretRef.name"),
    ("bad-quantity", {"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory"),
    (
        "gpu-on-cpu",
        {"device": "cpu", "resources": {"limits": {"nvidia.com/gpu": 1}}},
        "spec.resources.limits",
    ),
    (
        "monitor-without-metrics",
        {"monitoring": {"podMonitor": True}, "server": {"extraArgs": ["--no-metrics"]}},
        "spec.server.extraArgs",
    ),
    (
        "bad-toleration",
        {"tolerations": [{"key": "a", "effect": "Sometimes"}]},
        "spec.tolerations[0].effect",
    ),
    ("bad-interval", {"monitoring": {"interval": "often"}}, "spec.monitoring.interval"),
    ("bad-pull-policy", {"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
]


def _with(change: Mapping[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    manifest["spec"].update(copy.deepcopy(dict(change)))
    return manifest


@pytest.mark.parametrize(("change", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(crd, change, field) -> None:
    with pytest.raises(Invalid) as refused:
        crd.admit(_with(change))
    assert field in [c.field for c in refused.value.causes], refused.value
    assert field in str(refused.value)


@pytest.mark.parametrize("name", ["1model", "a" * 64, "with.dot"])
def test_names_that_cannot_name_a_service_are_refused(crd, name: str) -> None:
    manifest = copy.deepcopy(BASE)
    manifest["metadata"]["name"] = name
    with pytest.raises(Invalid) as refused:
        crd.admit(manifest)
    assert "metadata.name must start with a letter" in str(refused.value)


def test_each_refusal_is_specific(crd) -> None:
    """No invalid manifest is refused for an unrelated reason: one cause each."""
    for name, change, _field in INVALID:
        with pytest.raises(Invalid) as refused:
            crd.admit(_with(change))
        assert len(refused.value.causes) == 1, (name, refused.value)


def test_the_emulator_answers_422_naming_the_field() -> None:
    """kubectl apply gets a Status 422 Invalid with causes, like from a real API server."""
    with Cluster() as cluster:
        for name, change, field in INVALID[:3] + INVALID[8:9] + INVALID[11:12]:
            with pytest.raises(ApiStatusError) as refused:
                cluster.create(MD, _with(change))
            status = refused.value.body
            assert refused.value.status == 422, name
            assert status["reason"] == "Invalid"
            assert field in status["message"]
            assert field in [c["field"] for c in status["details"]["causes"]]
        created = cluster.create(MD, BASE)
        assert created["spec"]["replicas"] == 1, "schema defaults are applied on create"
        assert created["spec"]["storage"] == {"emptyDir": {}}
        with pytest.raises(ApiStatusError) as refused:
            cluster.patch(MD, "default", "bad", {"spec": {"replicas": -3}})
        assert refused.value.status == 422
        assert "spec.replicas" in refused.value.body["message"]
