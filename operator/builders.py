"""Pure manifest builders: one function per child object, spec in, dict out.

Nothing here talks to Kubernetes, so every option can be tested as a golden
file. Ports, mount points and probe paths come from `server.contract`, the
slug from `server.slug`: the pod runs exactly what these objects say, and the
server reads the same constants.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from modeldeploy.operator import labels
from modeldeploy.operator.spec import API_VERSION, KIND, ModelDeploymentSpec, pvc_mount_path
from modeldeploy.server import contract

HARVEST_CONTAINER = "harvest"
SERVER_CONTAINER = "server"
MODELS_VOLUME = "models"
TMP_VOLUME = "tmp"
SOURCE_VOLUME = "source"
API_KEYS_VOLUME = "api-keys"
#: Where the server container sees the API keys Secret (read-only).
API_KEYS_DIR = "/etc/modeldeploy/auth"
API_KEYS_FILE = f"{API_KEYS_DIR}/api-keys"
GPU_RESOURCE = "nvidia.com/gpu"

#: The pods run as the images' non-root user (Dockerfile.server); fsGroup makes the
#: models volume writable by it.
RUN_AS_USER = 10001
#: Seconds the kubelet waits beyond the server's drain timeout before SIGKILL.
GRACE_MARGIN_SECONDS = 15
STARTUP_PERIOD_SECONDS = 10
#: How much longer than the startup window a rollout may take before it counts as stuck.
PROGRESS_DEADLINE_MARGIN_SECONDS = 600

#: Resources an init container may inherit from the server's (accelerators stay with the server).
_HARVEST_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def owner_references(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """The controller reference that makes a child belong to (and die with) its ModelDeployment."""
    if not spec.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": spec.name,
            "uid": spec.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(spec: ModelDeploymentSpec, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": spec.namespace,
        "labels": labels.child_labels(spec.name, component),
    }
    owners = owner_references(spec)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def _security_context() -> dict[str, Any]:
    """Container security context that satisfies the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """Environment shared by both containers: caches on the volume, token from the Secret."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{contract.MODELS_MOUNT}/.hf"},
        {"name": "HF_HUB_CACHE", "value": contract.HF_CACHE_DIR},
        {"name": contract.CACHE_ENV, "value": contract.MODELS_MOUNT},
    ]
    if spec.hf_token is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": spec.hf_token.name, "key": spec.hf_token.key}
                },
            }
        )
    env.extend(dict(e) for e in spec.env)
    return env


def _mounts(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": MODELS_VOLUME, "mountPath": contract.MODELS_MOUNT},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if spec.source.scheme == "pvc":
        mounts.append(
            {
                "name": SOURCE_VOLUME,
                "mountPath": pvc_mount_path(spec.source.claim or ""),
                "readOnly": True,
            }
        )
    return mounts


def _volumes(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    storage = spec.storage
    if storage.kind == "emptyDir":
        empty: dict[str, Any] = {}
        if storage.size_limit:
            empty["sizeLimit"] = storage.size_limit
        if storage.medium:
            empty["medium"] = storage.medium
        models: dict[str, Any] = {"name": MODELS_VOLUME, "emptyDir": empty}
    else:
        models = {"name": MODELS_VOLUME, "persistentVolumeClaim": {"claimName": spec.pvc_name}}
    volumes = [models, {"name": TMP_VOLUME, "emptyDir": {}}]
    if spec.source.scheme == "pvc":
        volumes.append(
            {
                "name": SOURCE_VOLUME,
                "persistentVolumeClaim": {"claimName": spec.source.claim, "readOnly": True},
            }
        )
    if spec.server.api_keys is not None:
        volumes.append(
            {
                "name": API_KEYS_VOLUME,
                "secret": {
                    "secretName": spec.server.api_keys.name,
                    "items": [{"key": spec.server.api_keys.key, "path": "api-keys"}],
                    "defaultMode": 0o440,
                },
            }
        )
    return volumes


def _model_args(spec: ModelDeploymentSpec) -> list[str]:
    """Arguments both sub-commands share: where the model is and where its files go."""
    args = [
        spec.pod_source,
        "--slug-root",
        contract.SLUG_ROOT_DIR,
        "--cache-dir",
        contract.HF_CACHE_DIR,
    ]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if spec.model.quant:
        args += ["--quant", spec.model.quant]
    return args


def server_resources(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The server's resources; `device: cuda` without an accelerator limit asks for one GPU."""
    resources = {k: dict(v) for k, v in spec.resources.items() if v}
    if spec.device == "cuda":
        limits = resources.setdefault("limits", {})
        requests = resources.get("requests", {})
        if GPU_RESOURCE not in limits and GPU_RESOURCE not in requests:
            limits[GPU_RESOURCE] = 1
    return resources


def _harvest_resources(spec: ModelDeploymentSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    for kind, values in spec.resources.items():
        kept = {k: v for k, v in values.items() if k in _HARVEST_RESOURCES}
        if kept:
            resources[kind] = kept
    return resources


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": contract.PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def startup_failure_threshold(spec: ModelDeploymentSpec) -> int:
    """Startup-probe failures allowed so that the window covers startupTimeoutSeconds."""
    return max(1, math.ceil(spec.startup_timeout_seconds / STARTUP_PERIOD_SECONDS))


def _harvest_container(spec: ModelDeploymentSpec) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": HARVEST_CONTAINER,
        "image": spec.image,
        "command": ["modeldeploy"],
        "args": ["harvest", *_model_args(spec)],
        "env": _env(spec),
        "volumeMounts": _mounts(spec),
        "securityContext": _security_context(),
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = _harvest_resources(spec)
    if resources:
        container["resources"] = resources
    return container


def _server_container(spec: ModelDeploymentSpec) -> dict[str, Any]:
    server = spec.server
    args = [
        "serve",
        *_model_args(spec),
        "--host",
        "0.0.0.0",
        "--port",
        str(server.port),
        "--served-model-name",
        spec.served_model_name,
        "--dtype",
        spec.dtype,
        "--device",
        spec.device,
        "--max-concurrent",
        str(server.max_concurrent),
        "--max-queue",
        str(server.max_queue),
        "--timeout",
        str(server.timeout_seconds),
        "--max-prompt-tokens",
        str(server.max_prompt_tokens),
        "--drain-timeout",
        str(server.drain_timeout_seconds),
    ]
    mounts = _mounts(spec)
    if server.api_keys is not None:
        args += ["--api-key-file", API_KEYS_FILE]
        mounts.append({"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True})
    args += server.extra_args
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": spec.image,
        "command": ["modeldeploy"],
        "args": args,
        "ports": [{"name": contract.PORT_NAME, "containerPort": server.port, "protocol": "TCP"}],
        "env": _env(spec),
        "volumeMounts": mounts,
        "startupProbe": _probe(
            contract.READY_PATH, STARTUP_PERIOD_SECONDS, startup_failure_threshold(spec)
        ),
        "readinessProbe": _probe(contract.READY_PATH, 5, 3),
        "livenessProbe": _probe(contract.HEALTH_PATH, 10, 3),
        "securityContext": _security_context(),
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = server_resources(spec)
    if resources:
        container["resources"] = resources
    return container


def template_hash(template: dict[str, Any]) -> str:
    """A stable short hash of a pod template (canonical JSON, without the hash itself)."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def build_pod_template(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The pod template of the Deployment, with its own hash as an annotation."""
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # service env vars would collide with MODELDEPLOY_*
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": spec.server.drain_timeout_seconds + GRACE_MARGIN_SECONDS,
        "initContainers": [_harvest_container(spec)],
        "containers": [_server_container(spec)],
        "volumes": _volumes(spec),
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    template: dict[str, Any] = {
        "metadata": {"labels": labels.child_labels(spec.name)},
        "spec": pod_spec,
    }
    template["metadata"]["annotations"] = {labels.TEMPLATE_HASH: template_hash(template)}
    return template


def build_deployment(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """Deployment `<name>`: init container `harvest`, container `server`, probes, volumes."""
    template = build_pod_template(spec)
    metadata = _metadata(spec, spec.name, labels.SERVER_COMPONENT)
    metadata["annotations"] = {
        labels.TEMPLATE_HASH: template["metadata"]["annotations"][labels.TEMPLATE_HASH]
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": labels.selector_labels(spec.name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": spec.startup_timeout_seconds
            + PROGRESS_DEADLINE_MARGIN_SECONDS,
            "template": template,
        },
    }


def build_service(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """Service `<name>`: port 80 named `http` to the server's named port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, spec.name, labels.SERVER_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.selector_labels(spec.name),
            "ports": [
                {
                    "name": contract.PORT_NAME,
                    "port": contract.SERVICE_PORT,
                    "targetPort": contract.PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_pvc(spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    """PersistentVolumeClaim `<name>-models` when `storage.create` asks for one, else None."""
    storage = spec.storage
    if storage.kind != "create":
        return None
    pvc_spec: dict[str, Any] = {
        "accessModes": list(storage.access_modes),
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class:
        pvc_spec["storageClassName"] = storage.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(spec, f"{spec.name}-models", "storage"),
        "spec": pvc_spec,
    }


PODMONITOR_GROUP = "monitoring.coreos.com"
PODMONITOR_VERSION = "v1"
PODMONITOR_PLURAL = "podmonitors"


def build_podmonitor(spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    """PodMonitor `<name>` scraping the server's /metrics when monitoring.podMonitor is set."""
    if not spec.pod_monitor:
        return None
    return {
        "apiVersion": f"{PODMONITOR_GROUP}/{PODMONITOR_VERSION}",
        "kind": "PodMonitor",
        "metadata": _metadata(spec, spec.name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": labels.selector_labels(spec.name)},
            "podMetricsEndpoints": [
                {
                    "port": contract.PORT_NAME,
                    "path": contract.METRICS_PATH,
                    "interval": spec.scrape_interval,
                }
            ],
        },
    }


def build_children(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """Every child the spec asks for, in the order they should be applied."""
    children = [build_pvc(spec), build_deployment(spec), build_service(spec)]
    children.append(build_podmonitor(spec))
    return [c for c in children if c is not None]
