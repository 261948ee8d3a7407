"""A typed, defaulted view of a ModelDeployment, and the resource's identity.

The API server applies the CRD's defaults, but the operator must not depend on
that (an object stored before a default existed, a CRD installed by hand), so
every default is applied here once more; a test checks that these defaults
equal the CRD's. Everything downstream (builders, status) reads this view,
never the raw dict.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modeldeploy.server import contract
from modeldeploy.server.errors import SourceError, UserInputError
from modeldeploy.server.slug import slug_for
from modeldeploy.server.sources import Source, parse_source

GROUP = "modeldeploy.dev"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

#: Image the operator puts in pods whose spec has none (the chart sets the env).
SERVER_IMAGE_ENV = "MODELDEPLOY_SERVER_IMAGE"
FALLBACK_SERVER_IMAGE = "ghcr.io/modeldeploy/modeldeploy-server:0.1.0"

#: Where a pvc:// source's claim is mounted; the pod sees a file:// path below it.
PVC_SOURCE_ROOT = f"{contract.MODELS_MOUNT}/pvc"

DEFAULTS: dict[str, Any] = {
    "replicas": 1,
    "dtype": "auto",
    "device": "auto",
    "server.port": contract.SERVER_PORT,
    "server.maxConcurrent": 10,
    "server.maxQueue": 64,
    "server.timeoutSeconds": 300,
    "server.maxPromptTokens": 16384,
    "server.drainTimeoutSeconds": 30,
    "storage": {"emptyDir": {}},
    "storage.create.accessModes": ["ReadWriteOnce"],
    "hfTokenSecretRef.key": "token",
    "server.apiKeySecretRef.key": "api-keys",
    "startupTimeoutSeconds": 1800,
    "monitoring.podMonitor": False,
    "monitoring.interval": "30s",
}
"""Spec defaults by dotted path; must equal the CRD's `default`s (tests/test_crd.py)."""

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
StorageKind = Literal["claim", "create", "emptyDir"]


class SpecError(UserInputError):
    """The ModelDeployment's spec is invalid; the message names the field."""


def default_server_image() -> str:
    """The server image for specs without `image`: $MODELDEPLOY_SERVER_IMAGE or our release."""
    return os.environ.get(SERVER_IMAGE_ENV) or FALLBACK_SERVER_IMAGE


@dataclass(frozen=True)
class ModelSpec:
    source: str
    revision: str | None = None
    quant: str | None = None
    served_name: str | None = None


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = DEFAULTS["hfTokenSecretRef.key"]


@dataclass(frozen=True)
class ServerSpec:
    port: int = DEFAULTS["server.port"]
    max_concurrent: int = DEFAULTS["server.maxConcurrent"]
    max_queue: int = DEFAULTS["server.maxQueue"]
    timeout_seconds: int = DEFAULTS["server.timeoutSeconds"]
    max_prompt_tokens: int = DEFAULTS["server.maxPromptTokens"]
    drain_timeout_seconds: int = DEFAULTS["server.drainTimeoutSeconds"]
    extra_args: tuple[str, ...] = ()
    api_keys: SecretKeyRef | None = None


@dataclass(frozen=True)
class StorageSpec:
    """The /models volume: an existing claim, a claim we create, or an emptyDir."""

    kind: StorageKind = "emptyDir"
    claim_name: str | None = None
    size: str | None = None
    storage_class: str | None = None
    access_modes: tuple[str, ...] = tuple(DEFAULTS["storage.create.accessModes"])
    size_limit: str | None = None
    medium: str | None = None


@dataclass(frozen=True)
class ModelDeploymentSpec:
    """Everything the builders need about one ModelDeployment, defaults applied."""

    name: str
    namespace: str
    model: ModelSpec
    uid: str | None = None
    generation: int | None = None
    replicas: int = DEFAULTS["replicas"]
    image: str = field(default_factory=default_server_image)
    image_pull_policy: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    dtype: Dtype = DEFAULTS["dtype"]
    device: Device = DEFAULTS["device"]
    server: ServerSpec = field(default_factory=ServerSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    hf_token: SecretKeyRef | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    startup_timeout_seconds: int = DEFAULTS["startupTimeoutSeconds"]
    pod_monitor: bool = DEFAULTS["monitoring.podMonitor"]
    scrape_interval: str = DEFAULTS["monitoring.interval"]

    @property
    def source(self) -> Source:
        """The parsed `model.source` (as the user wrote it)."""
        return parse_source(self.model.source)

    @property
    def pod_source(self) -> str:
        """The SOURCE the containers get: a pvc:// source becomes a file path in its mount."""
        src = self.source
        if src.scheme == "pvc":
            return f"file://{pvc_mount_path(src.claim or '')}/{src.path or ''}".rstrip("/")
        return self.model.source

    @property
    def slug(self) -> str:
        """The slug directory name the pod's harvest will use (same inputs, same function)."""
        return slug_for(parse_source(self.pod_source), self.model.revision, self.model.quant)

    @property
    def served_model_name(self) -> str:
        return self.model.served_name or self.name

    @property
    def endpoint(self) -> str:
        """In-cluster base URL of the Service (port 80, so no port in the URL)."""
        return f"http://{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def pvc_name(self) -> str | None:
        """Name of the claim mounted at /models, whether it exists or we create it."""
        if self.storage.kind == "claim":
            return self.storage.claim_name
        if self.storage.kind == "create":
            return f"{self.name}-models"
        return None


def pvc_mount_path(claim: str) -> str:
    """Where the claim of a pvc:// source is mounted (read-only) in the pod."""
    return f"{PVC_SOURCE_ROOT}/{claim}"


def _get(data: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _typed(data: Mapping[str, Any], path: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = _get(data, path, None)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        raise SpecError(f"spec.{path}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", bool: "a boolean", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


#: The name becomes a Service name: a DNS-1035 label (the CRD checks it too).
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def parse_spec(body: Mapping[str, Any], *, default_image: str | None = None) -> ModelDeploymentSpec:
    """Build the typed view from a ModelDeployment object (metadata + spec).

    Raises SpecError naming the field when the object is not usable (the CRD's
    schema normally refuses such objects before they reach us).
    """
    meta = body.get("metadata") or {}
    name = meta.get("name") or ""
    if not _NAME.match(name) or len(name) > 63:
        raise SpecError(
            f"metadata.name: {name!r} must start with a letter and have at most 63 lowercase "
            "letters, digits or '-' (it names the Service)"
        )
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec: missing")
    source = _typed(spec, "model.source", str, None)
    if not source:
        raise SpecError("spec.model.source: required")
    model = ModelSpec(
        source=source,
        revision=_typed(spec, "model.revision", str, None),
        quant=_typed(spec, "model.quant", str, None),
        served_name=_typed(spec, "model.servedName", str, None),
    )
    try:
        parsed = parse_source(source)
    except SourceError as exc:
        raise SpecError(f"spec.model.source: {exc}") from None
    if parsed.scheme == "file" and not source.startswith("file://"):
        raise SpecError(f"spec.model.source: {source!r} must be a URI (file:///abs/path)")
    if model.revision and parsed.scheme != "hf":
        raise SpecError("spec.model.revision: only valid with hf:// sources")

    replicas = _typed(spec, "replicas", int, DEFAULTS["replicas"])
    if replicas < 0:
        raise SpecError(f"spec.replicas: must be 0 or more, got {replicas}")

    server = ServerSpec(
        port=_typed(spec, "server.port", int, DEFAULTS["server.port"]),
        max_concurrent=_typed(spec, "server.maxConcurrent", int, DEFAULTS["server.maxConcurrent"]),
        max_queue=_typed(spec, "server.maxQueue", int, DEFAULTS["server.maxQueue"]),
        timeout_seconds=_typed(
            spec, "server.timeoutSeconds", int, DEFAULTS["server.timeoutSeconds"]
        ),
        max_prompt_tokens=_typed(
            spec, "server.maxPromptTokens", int, DEFAULTS["server.maxPromptTokens"]
        ),
        drain_timeout_seconds=_typed(
            spec, "server.drainTimeoutSeconds", int, DEFAULTS["server.drainTimeoutSeconds"]
        ),
        extra_args=tuple(str(a) for a in _typed(spec, "server.extraArgs", list, [])),
        api_keys=_secret_ref(spec, "server.apiKeySecretRef"),
    )
    if not 1024 <= server.port <= 65535:
        raise SpecError(f"spec.server.port: must be between 1024 and 65535, got {server.port}")

    hf_token = _secret_ref(spec, "hfTokenSecretRef")

    result = ModelDeploymentSpec(
        name=name,
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        model=model,
        replicas=replicas,
        image=_typed(spec, "image", str, None) or default_image or default_server_image(),
        image_pull_policy=_typed(spec, "imagePullPolicy", str, None),
        image_pull_secrets=tuple(
            s["name"] for s in _typed(spec, "imagePullSecrets", list, []) if s.get("name")
        ),
        resources={k: dict(v) for k, v in _typed(spec, "resources", dict, {}).items() if v},
        dtype=_typed(spec, "dtype", str, DEFAULTS["dtype"]),
        device=_typed(spec, "device", str, DEFAULTS["device"]),
        server=server,
        storage=_parse_storage(spec),
        hf_token=hf_token,
        node_selector=dict(_typed(spec, "nodeSelector", dict, {})),
        tolerations=tuple(_typed(spec, "tolerations", list, [])),
        affinity=_typed(spec, "affinity", dict, None) or None,
        env=tuple(_typed(spec, "env", list, [])),
        startup_timeout_seconds=_typed(
            spec, "startupTimeoutSeconds", int, DEFAULTS["startupTimeoutSeconds"]
        ),
        pod_monitor=_typed(spec, "monitoring.podMonitor", bool, DEFAULTS["monitoring.podMonitor"]),
        scrape_interval=_typed(spec, "monitoring.interval", str, DEFAULTS["monitoring.interval"]),
    )
    try:
        _ = result.slug  # the pod's harvest would refuse what the slug code refuses
    except UserInputError as exc:
        raise SpecError(f"spec.model: {exc}") from None
    return result


def _secret_ref(spec: Mapping[str, Any], path: str) -> SecretKeyRef | None:
    ref = _typed(spec, path, dict, None)
    if ref is None:
        return None
    if not ref.get("name"):
        raise SpecError(f"spec.{path}.name: required")
    return SecretKeyRef(name=ref["name"], key=ref.get("key") or DEFAULTS[f"{path}.key"])


def _parse_storage(spec: Mapping[str, Any]) -> StorageSpec:
    storage = _typed(spec, "storage", dict, None) or DEFAULTS["storage"]
    kinds = [k for k in ("claim", "create", "emptyDir") if storage.get(k) is not None]
    if len(kinds) != 1:
        raise SpecError(
            "spec.storage: must set exactly one of storage.claim, storage.create or "
            f"storage.emptyDir (got {', '.join(kinds) or 'none'})"
        )
    kind: StorageKind = kinds[0]  # type: ignore[assignment]
    if kind == "claim":
        claim = _typed(spec, "storage.claim.name", str, None)
        if not claim:
            raise SpecError("spec.storage.claim.name: required")
        return StorageSpec(kind="claim", claim_name=claim)
    if kind == "create":
        size = _typed(spec, "storage.create.size", str, None)
        if not size:
            raise SpecError("spec.storage.create.size: required")
        return StorageSpec(
            kind="create",
            size=size,
            storage_class=_typed(spec, "storage.create.storageClassName", str, None),
            access_modes=tuple(
                _typed(
                    spec, "storage.create.accessModes", list, DEFAULTS["storage.create.accessModes"]
                )
            ),
        )
    return StorageSpec(
        kind="emptyDir",
        size_limit=_typed(spec, "storage.emptyDir.sizeLimit", str, None),
        medium=_typed(spec, "storage.emptyDir.medium", str, None) or None,
    )
