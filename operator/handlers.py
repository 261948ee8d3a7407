"""kopf glue: when to reconcile, and the one reconcile that all triggers share.

Every trigger (create, update, resume, the periodic timer, and any change of
a child Deployment or pod) runs the same level-based `reconcile`: read the
ModelDeployment afresh, apply the built children, read the Deployment and its
pods, write `status` if it changed and post an Event when the phase changed.
kopf's create/update handlers alone are edge-triggered (a missed event would
never be repaired); the timer and the child watches make the result converge.

The handlers are registered into a registry built per operator instance with
the context captured in closures, so a test can run, stop and restart the
operator in one process without global state leaking between runs.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client as k8s_client
from modeldeploy.operator import labels, metrics
from modeldeploy.operator.builders import (
    PODMONITOR_GROUP,
    PODMONITOR_PLURAL,
    PODMONITOR_VERSION,
    build_children,
)
from modeldeploy.operator.children import apply
from modeldeploy.operator.kubeapi import (
    PODS,
    ApiError,
    KubeApi,
    ResourceRef,
    connection_info,
    load_configuration,
)
from modeldeploy.operator.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from modeldeploy.operator.status import (
    DEGRADED,
    FAILED,
    PHASES,
    build_status,
    failed_status,
    observe,
    status_changed,
)

log = logging.getLogger("modeldeploy.operator")

MD_RESOURCE = ResourceRef(GROUP, VERSION, PLURAL)
#: Default seconds between level-based re-reconciles of every ModelDeployment.
DEFAULT_INTERVAL = 30.0
#: Seconds between re-checks of whether the PodMonitor CRD exists.
PODMONITOR_CHECK_TTL = 60.0


@dataclass
class OperatorContext:
    """What the handlers share: the API connection and per-object bookkeeping."""

    default_image: str | None = None
    interval: float = DEFAULT_INTERVAL
    #: Preset in tests (an emulator's URL); loaded from the cluster otherwise.
    configuration: k8s_client.Configuration | None = None
    api: KubeApi | None = None
    _locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)
    _podmonitor_checked: tuple[float, bool] | None = None
    _podmonitor_warned: set[tuple[str, str]] = field(default_factory=set)

    def lock_for(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def record_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Keep the by-phase gauge equal to the phases last written."""
        with self._guard:
            if phase is None:
                self._phases.pop(key, None)
                self._locks.pop(key, None)
            else:
                self._phases[key] = phase
            counts = Counter(self._phases.values())
        for known in PHASES:
            metrics.MODELDEPLOYMENTS.labels(phase=known).set(counts.get(known, 0))

    def first_podmonitor_warning(self, key: tuple[str, str]) -> bool:
        """True once per object and operator run: the missing-CRD warning is not repeated."""
        with self._guard:
            first = key not in self._podmonitor_warned
            self._podmonitor_warned.add(key)
            return first

    def podmonitor_available(self) -> bool:
        now = time.monotonic()
        cached = self._podmonitor_checked
        if cached is not None and now - cached[0] < PODMONITOR_CHECK_TTL:
            return cached[1]
        assert self.api is not None
        found = self.api.has_group_version(PODMONITOR_GROUP, PODMONITOR_VERSION, PODMONITOR_PLURAL)
        self._podmonitor_checked = (now, found)
        return found


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_type(phase: str) -> str:
    return "Warning" if phase in (DEGRADED, FAILED) else "Normal"


def _write_status(
    api: KubeApi, body: Mapping[str, Any], new: dict[str, Any]
) -> dict[str, Any] | None:
    """Merge-patch `status` so that it equals `new` (keys we no longer report are removed)."""
    old = body.get("status") or {}
    if not status_changed(old, new) and not (set(old) - set(new)):
        return None
    patch = {**{k: None for k in old if k not in new}, **new}
    meta = body["metadata"]
    path = MD_RESOURCE.path(meta["namespace"], meta["name"], "status")
    return api.merge_patch(path, {"status": patch})


def reconcile(ctx: OperatorContext, namespace: str, name: str, handler: str) -> str | None:
    """Converge one ModelDeployment; return its phase (None when it is gone).

    API failures become kopf.TemporaryError, so kopf retries the handler.
    """
    assert ctx.api is not None, "the login handler sets the API connection"
    api = ctx.api
    key = (namespace, name)
    started = time.monotonic()
    result = "success"
    try:
        with ctx.lock_for(key):
            phase, result = _reconcile_locked(ctx, api, namespace, name)
            return phase
    except ApiError as exc:
        result = "retry"
        raise kopf.TemporaryError(f"API call failed: {exc}", delay=2) from exc
    except Exception:
        result = "error"
        raise
    finally:
        metrics.RECONCILES.labels(handler=handler, result=result).inc()
        metrics.RECONCILE_DURATION.labels(handler=handler).observe(time.monotonic() - started)


def _reconcile_locked(
    ctx: OperatorContext, api: KubeApi, namespace: str, name: str
) -> tuple[str | None, str]:
    """The reconcile proper; returns (phase, result label for the metrics)."""
    body = api.get_or_none(MD_RESOURCE.path(namespace, name))
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None, "success"  # deleted: ownerReferences take the children with it
    meta = body["metadata"]
    old_status = body.get("status") or {}
    try:
        spec = parse_spec(body, default_image=ctx.default_image)
    except SpecError as exc:
        # Nothing to retry: the status says which field is wrong until the user fixes it.
        status = failed_status(name, meta.get("generation"), str(exc), _now())
        _write_status(api, body, status)
        _phase_changed(ctx, body, old_status, status)
        return status["phase"], "error"

    deployment: dict[str, Any] | None = None
    for child in build_children(spec):
        if child["kind"] == "PodMonitor" and not ctx.podmonitor_available():
            if ctx.first_podmonitor_warning((namespace, name)):
                kopf.event(
                    body,
                    type="Warning",
                    reason="PodMonitorUnavailable",
                    message="monitoring.podMonitor is set but the PodMonitor CRD "
                    "(monitoring.coreos.com/v1) is not installed; skipping it",
                )
            continue
        obj, action = apply(api, child)
        if action != "unchanged":
            log.info("%s %s %s/%s", action, child["kind"], namespace, child["metadata"]["name"])
        if child["kind"] == "Deployment":
            deployment = obj
    pods = api.get(PODS.path(namespace), labelSelector=labels.selector_string(name))
    observation = observe(spec, deployment, pods.get("items") or [])
    status = build_status(spec, observation, old_status, _now())
    _write_status(api, body, status)
    _phase_changed(ctx, body, old_status, status)
    return observation.phase, "success"


def _phase_changed(
    ctx: OperatorContext, body: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]
) -> None:
    """Post an Event when the phase (or a failure's message) changes; update the gauge."""
    meta = body["metadata"]
    ctx.record_phase((meta["namespace"], meta["name"]), new["phase"])
    phase, message = new["phase"], new.get("message") or ""
    if old.get("phase") == phase and (
        old.get("message") == message or phase not in (DEGRADED, FAILED)
    ):
        return
    kopf.event(body, type=_event_type(phase), reason=phase, message=message)


def build_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """kopf settings: our own finalizer and annotations, no peering, no CRD scanning."""
    settings = settings or kopf.OperatorSettings()
    settings.persistence.finalizer = labels.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=labels.DOMAIN)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=labels.DOMAIN, key="last-handled-configuration"
    )
    settings.peering.standalone = True
    settings.scanning.disabled = True
    # Our own Events say what happened; kopf's per-log-line events would drown them.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "modeldeploy-operator"
    settings.watching.server_timeout = 300
    return settings


def build_registry(ctx: OperatorContext) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator, bound to `ctx`."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        if ctx.configuration is None:
            ctx.configuration = load_configuration()
        if ctx.api is None:
            ctx.api = KubeApi(ctx.configuration)
        return connection_info(ctx.configuration)

    # Explicit ids: they name kopf's progress annotations (modeldeploy.dev/reconcile).
    @kopf.on.resume(*resource, id="reconcile", registry=registry, backoff=2)
    @kopf.on.create(*resource, id="reconcile", registry=registry, backoff=2)
    @kopf.on.update(*resource, id="reconcile", registry=registry, backoff=2)
    def converge(namespace: str, name: str, reason: str, **_: Any) -> None:
        reconcile(ctx, namespace, name, handler=str(reason))

    @kopf.timer(
        *resource, id="resync", registry=registry, interval=ctx.interval, initial_delay=ctx.interval
    )
    def resync(namespace: str, name: str, **_: Any) -> None:
        reconcile(ctx, namespace, name, handler="timer")

    @kopf.on.delete(*resource, id="forget", registry=registry, optional=True)
    def forget(namespace: str, name: str, **_: Any) -> None:
        ctx.record_phase((namespace, name), None)

    def child_changed(namespace: str | None, meta: Mapping[str, Any], kind: str) -> None:
        owner = (meta.get("labels") or {}).get(labels.INSTANCE)
        if not owner or not namespace:
            return
        try:
            reconcile(ctx, namespace, owner, handler=kind)
        except (kopf.TemporaryError, kopf.PermanentError) as exc:
            log.debug("reconcile of %s/%s after a %s change: %s", namespace, owner, kind, exc)

    managed = labels.MANAGED_FILTER

    @kopf.on.event("apps", "v1", "deployments", id="deployment", labels=managed, registry=registry)
    def deployment_event(namespace: str | None, meta: Mapping[str, Any], **_: Any) -> None:
        child_changed(namespace, meta, "deployment")

    @kopf.on.event("", "v1", "pods", id="pod", labels=managed, registry=registry)
    def pod_event(namespace: str | None, meta: Mapping[str, Any], **_: Any) -> None:
        child_changed(namespace, meta, "pod")

    return registry
