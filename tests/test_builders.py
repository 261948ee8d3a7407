"""The manifest builders: golden files per example, and each option's effect on the pod.

Golden files live in tests/golden/builders/; after an intended change, rewrite
them with `MODELDEPLOY_UPDATE_GOLDEN=1 pytest tests/test_builders.py` and review
the diff. Every built object is also validated against the Kubernetes 1.35
OpenAPI schema (strict: unknown fields are errors), and the containers'
arguments are parsed by the real `harvest` and `serve` argument parsers.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kube.crd import load_crd
from modeldeploy.operator import builders, labels
from modeldeploy.operator.spec import ModelDeploymentSpec, parse_spec
from modeldeploy.server import contract, harvest_cli
from modeldeploy.server.http import settings as serve_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "builders"
IMAGE = "registry.test/modeldeploy-server:1.2.3"
K8S_VERSION = "1.35.0"


def _spec(spec: dict[str, Any], name: str = "demo") -> ModelDeploymentSpec:
    """A spec as the operator sees it: admitted (defaulted) by the CRD, then parsed."""
    manifest = {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }
    return parse_spec(load_crd().admit(manifest), default_image=IMAGE)


def _example(path: Path) -> ModelDeploymentSpec:
    manifest = yaml.safe_load(path.read_text())
    return _spec(manifest["spec"], manifest["metadata"]["name"])


def _pod(spec: ModelDeploymentSpec) -> dict[str, Any]:
    return builders.build_deployment(spec)["spec"]["template"]["spec"]


def _container(spec: ModelDeploymentSpec, name: str) -> dict[str, Any]:
    pod = _pod(spec)
    return next(c for c in pod["initContainers"] + pod["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_children_of_each_example(path: Path) -> None:
    children = builders.build_children(_example(path))
    text = yaml.safe_dump_all(children, sort_keys=False)
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("MODELDEPLOY_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing golden file {golden}; set MODELDEPLOY_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{path.name}: built children differ from {golden}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_children_are_valid_kubernetes_objects(path: Path) -> None:
    for child in builders.build_children(_example(path)):
        if child["kind"] == "PodMonitor":
            continue  # not a core API type
        try:
            kubernetes_validate.validate(copy.deepcopy(child), K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{child['kind']} of {path.name}: {exc.message} at {list(exc.path)}")


def test_children_share_labels_selector_and_owner() -> None:
    spec = _spec(
        {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "monitoring": {"podMonitor": True},
            "storage": {"create": {"size": "1Gi"}},
        }
    )
    children = builders.build_children(spec)
    assert [c["kind"] for c in children] == [
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodMonitor",
    ]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "modeldeploy.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "demo",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        for key in (labels.NAME, labels.INSTANCE, labels.COMPONENT, labels.MANAGED_BY):
            assert key in meta["labels"], (child["kind"], key)
    deployment, service, monitor = children[1], children[2], children[3]
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert service["spec"]["selector"] == selector
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == contract.METRICS_PATH
    assert labels.selector_string("demo") == ",".join(
        f"{k}={v}" for k, v in sorted(selector.items())
    )


def test_harvest_and_serve_get_arguments_their_parsers_accept() -> None:
    """The pod runs exactly `modeldeploy harvest ...` and `modeldeploy serve ...` as built."""
    spec = _spec(
        {
            "model": {
                "source": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                "quant": "Q4_K_M",
                "revision": "v2",
            },
            "server": {
                "port": 9000,
                "maxConcurrent": 3,
                "maxQueue": 7,
                "timeoutSeconds": 60,
                "maxPromptTokens": 999,
                "drainTimeoutSeconds": 12,
                "extraArgs": ["--max-model-len", "2048"],
            },
            "dtype": "bfloat16",
            "env": [{"name": "MODELDEPLOY_LOG_LEVEL", "value": "debug"}],
        },
        name="qwen",
    )
    harvest, server = _container(spec, "harvest"), _container(spec, "server")
    assert harvest["command"] == server["command"] == ["modeldeploy"]
    assert harvest["args"][0] == "harvest"
    parser = argparse.ArgumentParser()
    harvest_cli.add_arguments(parser)
    parsed = parser.parse_args(harvest["args"][1:])
    assert parsed.source == "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    assert (parsed.slug_root, parsed.cache_dir) == (contract.SLUG_ROOT_DIR, contract.HF_CACHE_DIR)
    assert (parsed.revision, parsed.quant) == ("v2", "Q4_K_M")

    assert server["args"][0] == "serve"
    parser = argparse.ArgumentParser()
    serve_settings.add_arguments(parser)
    settings = serve_settings.settings_from_args(
        parser.parse_args(server["args"][1:]), environ=_env(server)
    )
    assert settings.source == parsed.source
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.served_model_name == "qwen"
    assert (settings.dtype, settings.device) == ("bfloat16", "auto")
    assert (settings.max_concurrent, settings.max_queue, settings.timeout) == (3, 7, 60.0)
    assert (settings.max_prompt_tokens, settings.drain_timeout) == (999, 12.0)
    assert settings.max_model_len == 2048
    assert str(settings.slug_root) == contract.SLUG_ROOT_DIR
    assert str(settings.cache_dir) == contract.HF_CACHE_DIR
    assert (settings.revision, settings.quant) == ("v2", "Q4_K_M")
    assert settings.log_level == "debug", "user env reaches the server"
    assert server["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]


@pytest.mark.parametrize(
    ("storage", "volume"),
    [
        ({}, {"name": "models", "emptyDir": {}}),
        (
            {"emptyDir": {"sizeLimit": "8Gi", "medium": "Memory"}},
            {"name": "models", "emptyDir": {"sizeLimit": "8Gi", "medium": "Memory"}},
        ),
        (
            {"claim": {"name": "shared"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": "shared"}},
        ),
        (
            {"create": {"size": "20Gi"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": "demo-models"}},
        ),
    ],
    ids=["default-emptydir", "emptydir-options", "existing-claim", "created-claim"],
)
def test_storage_kinds_mount_one_models_volume(storage, volume) -> None:
    spec = _spec({"model": {"source": "hf://a/b"}, **({"storage": storage} if storage else {})})
    pod = _pod(spec)
    assert pod["volumes"][0] == volume
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    for container in pod["initContainers"] + pod["containers"]:
        assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert _env(container)["HF_HUB_CACHE"] == contract.HF_CACHE_DIR
    pvc = builders.build_pvc(spec)
    if "create" in storage:
        assert pvc["metadata"]["name"] == "demo-models"
        assert pvc["spec"] == {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "20Gi"}},
        }
    else:
        assert pvc is None


def test_created_claim_options() -> None:
    spec = _spec(
        {
            "model": {"source": "hf://a/b"},
            "storage": {
                "create": {
                    "size": "5Gi",
                    "storageClassName": "fast",
                    "accessModes": ["ReadWriteMany"],
                }
            },
        }
    )
    assert builders.build_pvc(spec)["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }


def test_pvc_source_is_mounted_read_only_and_passed_as_a_file_path() -> None:
    spec = _spec({"model": {"source": "pvc://store/qwen/model.gguf"}})
    pod = _pod(spec)
    assert {
        "name": "source",
        "persistentVolumeClaim": {"claimName": "store", "readOnly": True},
    } in pod["volumes"]
    for container in pod["initContainers"] + pod["containers"]:
        assert {
            "name": "source",
            "mountPath": "/models/pvc/store",
            "readOnly": True,
        } in container["volumeMounts"]
        assert container["args"][1] == "file:///models/pvc/store/qwen/model.gguf"


def test_hf_token_reaches_both_containers() -> None:
    with_token = _spec({"model": {"source": "hf://org/gated"}, "hfTokenSecretRef": {"name": "hf"}})
    for name in ("harvest", "server"):
        assert _env(_container(with_token, name))["HF_TOKEN"] == {
            "secretKeyRef": {"name": "hf", "key": "token"}
        }
    custom_key = _spec(
        {"model": {"source": "hf://o/r"}, "hfTokenSecretRef": {"name": "s", "key": "k"}}
    )
    assert _env(_container(custom_key, "harvest"))["HF_TOKEN"]["secretKeyRef"]["key"] == "k"
    without = _spec({"model": {"source": "hf://org/open"}})
    for name in ("harvest", "server"):
        assert "HF_TOKEN" not in _env(_container(without, name))


def test_api_keys_secret_is_mounted_for_the_server_only() -> None:
    spec = _spec({"model": {"source": "hf://a/b"}, "server": {"apiKeySecretRef": {"name": "keys"}}})
    assert {
        "name": "api-keys",
        "secret": {
            "secretName": "keys",
            "items": [{"key": "api-keys", "path": "api-keys"}],
            "defaultMode": 0o440,
        },
    } in _pod(spec)["volumes"]
    server, harvest = _container(spec, "server"), _container(spec, "harvest")
    assert {"name": "api-keys", "mountPath": "/etc/modeldeploy/auth", "readOnly": True} in server[
        "volumeMounts"
    ]
    assert "api-keys" not in [m["name"] for m in harvest["volumeMounts"]]
    args = server["args"]
    assert args[args.index("--api-key-file") + 1] == "/etc/modeldeploy/auth/api-keys"
    assert (
        "--api-key-file"
        not in _container(_spec({"model": {"source": "hf://a/b"}}), "server")["args"]
    )


@pytest.mark.parametrize(
    ("spec", "limits"),
    [
        ({"device": "cuda"}, {"nvidia.com/gpu": 1}),
        (
            {"device": "cuda", "resources": {"limits": {"memory": "8Gi"}}},
            {"memory": "8Gi", "nvidia.com/gpu": 1},
        ),
        ({"device": "cuda", "resources": {"limits": {"nvidia.com/gpu": 2}}}, {"nvidia.com/gpu": 2}),
        ({"device": "cpu"}, None),
        ({"device": "auto", "resources": {"limits": {"memory": "2Gi"}}}, {"memory": "2Gi"}),
    ],
    ids=["cuda-default-gpu", "cuda-keeps-limits", "cuda-explicit-count", "cpu", "auto"],
)
def test_gpu_request_follows_device(spec, limits) -> None:
    built = _spec({"model": {"source": "hf://a/b"}, **spec})
    server = _container(built, "server")
    assert server.get("resources", {}).get("limits") == limits
    harvest = _container(built, "harvest")
    assert "nvidia.com/gpu" not in str(harvest.get("resources")), "the GPU stays with the server"


@pytest.mark.parametrize("timeout", [60, 1800, 1805, 7200])
def test_startup_probe_window_covers_startup_timeout(timeout: int) -> None:
    server = _container(
        _spec({"model": {"source": "hf://a/b"}, "startupTimeoutSeconds": timeout}), "server"
    )
    startup = server["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert timeout <= window < timeout + startup["periodSeconds"]
    assert startup["httpGet"] == {"path": contract.READY_PATH, "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": contract.READY_PATH, "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": contract.HEALTH_PATH, "port": "http"}
    deployment = builders.build_deployment(
        _spec({"model": {"source": "hf://a/b"}, "startupTimeoutSeconds": timeout})
    )
    assert deployment["spec"]["progressDeadlineSeconds"] > timeout


def test_default_startup_window_is_thirty_minutes() -> None:
    startup = _container(_spec({"model": {"source": "hf://a/b"}}), "server")["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1800


@pytest.mark.parametrize("drain", [1, 30, 600])
def test_grace_period_exceeds_drain_timeout(drain: int) -> None:
    spec = _spec({"model": {"source": "hf://a/b"}, "server": {"drainTimeoutSeconds": drain}})
    assert _pod(spec)["terminationGracePeriodSeconds"] > drain
    assert "--drain-timeout" in _container(spec, "server")["args"]


def test_restricted_security_context() -> None:
    spec = _spec({"model": {"source": "hf://a/b"}})
    pod = _pod(spec)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    for container in pod["initContainers"] + pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert container["terminationMessagePath"] == contract.TERMINATION_LOG


def test_scheduling_and_image_options_reach_the_pod() -> None:
    spec = _spec(
        {
            "model": {"source": "hf://a/b"},
            "image": "example.com/server:9",
            "imagePullPolicy": "Always",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        }
    )
    pod = _pod(spec)
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for container in pod["initContainers"] + pod["containers"]:
        assert container["image"] == "example.com/server:9"
        assert container["imagePullPolicy"] == "Always"
        assert _env(container)["HTTPS_PROXY"] == "http://proxy:3128"
    default = _container(_spec({"model": {"source": "hf://a/b"}}), "server")
    assert default["image"] == IMAGE, "no spec.image: the operator's default"
    assert "imagePullPolicy" not in default


def test_template_hash_changes_with_the_pod_not_with_the_replica_count() -> None:
    def hashes(spec: dict[str, Any]) -> tuple[str, str]:
        deployment = builders.build_deployment(_spec(spec))
        return (
            deployment["metadata"]["annotations"][labels.TEMPLATE_HASH],
            deployment["spec"]["template"]["metadata"]["annotations"][labels.TEMPLATE_HASH],
        )

    base = hashes({"model": {"source": "hf://a/b"}})
    assert base[0] == base[1]
    assert hashes({"model": {"source": "hf://a/b"}, "replicas": 5}) == base
    assert hashes({"model": {"source": "hf://a/c"}}) != base
    assert hashes({"model": {"source": "hf://a/b"}, "server": {"maxConcurrent": 2}}) != base


def test_podmonitor_only_when_asked() -> None:
    assert builders.build_podmonitor(_spec({"model": {"source": "hf://a/b"}})) is None
    monitor = builders.build_podmonitor(
        _spec(
            {"model": {"source": "hf://a/b"}, "monitoring": {"podMonitor": True, "interval": "15s"}}
        )
    )
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"}
    ]
