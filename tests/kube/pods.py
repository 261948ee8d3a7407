"""Pods and pod statuses as the Deployment controller and the kubelet would write them.

The emulator has no controllers: tests create the pods of a Deployment and
move them through the kubelet's states by hand with these helpers.
"""

from __future__ import annotations

import copy
from typing import Any

NOW = "2026-01-01T00:00:00Z"


def pod_for(deployment: dict[str, Any], index: int) -> dict[str, Any]:
    """Pod number `index` of `deployment`, with the template's labels and spec."""
    template = deployment["spec"]["template"]
    meta = deployment["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-7d4b9c-{index:05d}",
            "namespace": meta["namespace"],
            "labels": dict(template["metadata"]["labels"]),
            "annotations": dict(template["metadata"].get("annotations") or {}),
        },
        "spec": copy.deepcopy(template["spec"]),
    }


def _cond(kind: str, status: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    cond = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": NOW}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _running() -> dict[str, Any]:
    return {"running": {"startedAt": NOW}}


def _terminated(code: int, reason: str, message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {"exitCode": code, "reason": reason, "finishedAt": NOW}
    if message:
        state["message"] = message
    return {"terminated": state}


def _waiting(reason: str, message: str = "") -> dict[str, Any]:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


def _container(
    name: str,
    state: dict[str, Any],
    *,
    ready: bool = False,
    restarts: int = 0,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status = {
        "name": name,
        "state": state,
        "ready": ready,
        "restartCount": restarts,
        "image": "registry.test/modeldeploy-server:test",
    }
    status["lastState"] = last or {}
    return status


def _status(
    phase: str,
    init: dict[str, Any],
    server: dict[str, Any],
    *,
    initialized: bool,
    ready: bool,
) -> dict[str, Any]:
    return {
        "phase": phase,
        "conditions": [
            _cond("PodScheduled", True),
            _cond("Initialized", initialized),
            _cond("ContainersReady", ready),
            _cond("Ready", ready),
        ],
        "initContainerStatuses": [init],
        "containerStatuses": [server],
    }


def harvesting() -> dict[str, Any]:
    """The harvest init container runs; the server waits."""
    return _status(
        "Pending",
        _container("harvest", _running()),
        _container("server", _waiting("PodInitializing")),
        initialized=False,
        ready=False,
    )


def loading(restarts: int = 0) -> dict[str, Any]:
    """Harvest done; the server runs but /ready still answers 503."""
    return _status(
        "Running",
        _container("harvest", _terminated(0, "Completed"), ready=True),
        _container("server", _running(), restarts=restarts),
        initialized=True,
        ready=False,
    )


def ready() -> dict[str, Any]:
    return _status(
        "Running",
        _container("harvest", _terminated(0, "Completed"), ready=True),
        _container("server", _running(), ready=True),
        initialized=True,
        ready=True,
    )


def harvest_failed(message: str, *, restarts: int = 2) -> dict[str, Any]:
    """The harvest exited 2 with `message` in its termination log and is backing off."""
    return _status(
        "Pending",
        _container(
            "harvest",
            _waiting("CrashLoopBackOff", "back-off 40s restarting failed container"),
            restarts=restarts,
            last=_terminated(2, "Error", message),
        ),
        _container("server", _waiting("PodInitializing")),
        initialized=False,
        ready=False,
    )


def server_crashloop(message: str, *, restarts: int = 3) -> dict[str, Any]:
    """The server keeps exiting (e.g. a load failure) with `message` as termination message."""
    return _status(
        "Running",
        _container("harvest", _terminated(0, "Completed"), ready=True),
        _container(
            "server",
            _waiting("CrashLoopBackOff", "back-off 1m20s restarting failed container"),
            restarts=restarts,
            last=_terminated(1, "Error", message),
        ),
        initialized=True,
        ready=False,
    )


def server_exited(code: int, message: str = "", *, restarts: int = 0) -> dict[str, Any]:
    """The server container has just exited with `code`; the kubelet has not restarted it yet."""
    reason = "OOMKilled" if code == 137 and "memory" in message else "Error"
    return _status(
        "Running",
        _container("harvest", _terminated(0, "Completed"), ready=True),
        _container("server", _terminated(code, reason, message), restarts=restarts),
        initialized=True,
        ready=False,
    )


def harvest_exited(code: int, message: str) -> dict[str, Any]:
    """The harvest init container has just exited with `code` (before any back-off)."""
    return _status(
        "Pending",
        _container("harvest", _terminated(code, "Error", message)),
        _container("server", _waiting("PodInitializing")),
        initialized=False,
        ready=False,
    )


def harvest_retrying(code: int, message: str, *, restarts: int = 1) -> dict[str, Any]:
    """The kubelet re-runs a harvest init container that exited with `code` before."""
    return _status(
        "Pending",
        _container(
            "harvest", _running(), restarts=restarts, last=_terminated(code, "Error", message)
        ),
        _container("server", _waiting("PodInitializing")),
        initialized=False,
        ready=False,
    )


def image_pull_backoff(image: str) -> dict[str, Any]:
    return _status(
        "Pending",
        _container(
            "harvest",
            _waiting("ImagePullBackOff", f'Back-off pulling image "{image}"'),
        ),
        _container("server", _waiting("PodInitializing")),
        initialized=False,
        ready=False,
    )


def unschedulable(message: str) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [_cond("PodScheduled", False, "Unschedulable", message)],
    }


def deployment_status(
    *, replicas: int, ready: int, updated: int | None = None, generation: int = 1
) -> dict[str, Any]:
    """What the Deployment controller would report for these pod counts."""
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas if updated is None else updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": max(replicas - ready, 0),
    }
