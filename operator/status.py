"""Pure status computation: the child Deployment and its pods in, `status` out.

The phase is read from what the kubelet reports, not from what we asked for:
Harvesting while the `harvest` init container runs, Loading while the server
runs but is not ready, Ready only when every desired replica is ready. A
failure's own words (the container's termination message, or the kubelet's
reason such as CrashLoopBackOff) become `status.message` and the conditions'
messages, so `kubectl get md` and `kubectl describe md` tell the user why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modeldeploy.operator import labels
from modeldeploy.operator.builders import HARVEST_CONTAINER, SERVER_CONTAINER
from modeldeploy.operator.spec import ModelDeploymentSpec
from modeldeploy.server.cli import EXIT_BAD_INPUT

PENDING = "Pending"
HARVESTING = "Harvesting"
LOADING = "Loading"
READY = "Ready"
DEGRADED = "Degraded"
FAILED = "Failed"
PHASES = (PENDING, HARVESTING, LOADING, READY, DEGRADED, FAILED)

#: Waiting reasons after which a container will not get better on its own.
FAILING_WAIT_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
#: Longest failure message kept in status (termination messages are up to 4 KiB).
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Observation:
    """What the operator concluded from the children, before it is written as status."""

    phase: str
    reason: str
    message: str
    replicas: int
    ready_replicas: int
    rolling: bool = False


@dataclass(frozen=True)
class _Failure:
    reason: str
    message: str


def _short(text: str) -> str:
    text = " ".join(text.strip().split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _container_failure(status: Mapping[str, Any], label: str) -> _Failure | None:
    """A failure of one container, from its state and its last termination."""
    state = status.get("state") or {}
    last = (status.get("lastState") or {}).get("terminated") or {}
    waiting = state.get("waiting")
    if waiting and waiting.get("reason") in FAILING_WAIT_REASONS:
        reason = waiting["reason"]
        detail = (last.get("message") or "").strip() or waiting.get("message") or reason
        if last.get("exitCode") is not None and not (last.get("message") or "").strip():
            detail = f"{detail} (exit code {last['exitCode']})"
        return _Failure(reason, _short(f"{label}: {detail}"))
    terminated = state.get("terminated")
    if terminated and terminated.get("exitCode") == EXIT_BAD_INPUT:
        # Exit 2 is `modeldeploy`'s "bad input" (no such model, unsupported file): a restart
        # cannot fix it. Other exits (a kill, a crash) count once the kubelet backs off.
        reason = terminated.get("reason") or "Error"
        detail = (terminated.get("message") or "").strip() or (
            f"{reason} (exit code {terminated.get('exitCode')})"
        )
        return _Failure(reason, _short(f"{label}: {detail}"))
    return None


def _bad_input_retry(status: Mapping[str, Any], label: str) -> _Failure | None:
    """A harvest that already exited 2 and is being retried on the same input.

    The kubelet retries a failed init container, so between back-offs it is
    `running` again; the input has not changed, so the retry will fail the same
    way. Reporting Harvesting there would make the phase flap Failed <-> Harvesting
    (with an Event pair per retry) while nothing can succeed. The server container
    is different: a running server after a kill is a genuine recovery.
    """
    last = (status.get("lastState") or {}).get("terminated") or {}
    if "running" not in (status.get("state") or {}) or last.get("exitCode") != EXIT_BAD_INPUT:
        return None
    detail = (last.get("message") or "").strip() or f"exit code {EXIT_BAD_INPUT}"
    return _Failure("HarvestFailed", _short(f"{label}: {detail}"))


def _statuses(pod: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get(key) or []:
        if status.get("name") == name:
            return status
    return None


def _condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    cond = _condition(pod, "Ready")
    return bool(cond and cond.get("status") == "True")


def pod_stage(pod: Mapping[str, Any]) -> str:
    """Where one pod is: Pending, Harvesting, Loading or Ready (failures are separate)."""
    if _pod_ready(pod):
        return READY
    harvest = _statuses(pod, "initContainerStatuses", HARVEST_CONTAINER) or {}
    harvest_state = harvest.get("state") or {}
    if "running" in harvest_state:
        return HARVESTING
    harvested = (harvest_state.get("terminated") or {}).get("exitCode") == 0
    server = _statuses(pod, "containerStatuses", SERVER_CONTAINER) or {}
    if harvested or "running" in (server.get("state") or {}):
        return LOADING
    return PENDING


def pod_failure(pod: Mapping[str, Any]) -> _Failure | None:
    """Why a pod cannot become ready on its own, or None."""
    harvest = _statuses(pod, "initContainerStatuses", HARVEST_CONTAINER)
    if harvest is not None:
        failure = _container_failure(harvest, "harvest") or _bad_input_retry(harvest, "harvest")
        if failure is not None:
            if failure.reason in {"CrashLoopBackOff", "Error"}:
                return _Failure("HarvestFailed", failure.message)
            return failure
    server = _statuses(pod, "containerStatuses", SERVER_CONTAINER)
    if server is not None:
        failure = _container_failure(server, "server")
        if failure is not None:
            return failure
    if (pod.get("status") or {}).get("phase") == "Failed":
        status = pod.get("status") or {}
        reason = status.get("reason") or "PodFailed"
        return _Failure(reason, _short(status.get("message") or reason))
    return None


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        cond = _condition(pod, "PodScheduled")
        if cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return _short(f"pod {pod['metadata'].get('name')} unschedulable: {cond.get('message')}")
    return None


def _deployment_failure(deployment: Mapping[str, Any]) -> _Failure | None:
    progressing = _condition(deployment, "Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return _Failure("ProgressDeadlineExceeded", _short(progressing.get("message") or ""))
    replica_failure = _condition(deployment, "ReplicaFailure")
    if replica_failure and replica_failure.get("status") == "True":
        return _Failure(
            replica_failure.get("reason") or "ReplicaFailure",
            _short(replica_failure.get("message") or ""),
        )
    return None


def _live(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]


def observe(
    spec: ModelDeploymentSpec,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
) -> Observation:
    """Decide the phase from the Deployment and its (non-terminating) pods."""
    desired = spec.replicas
    if deployment is None:
        return Observation(PENDING, "DeploymentMissing", "waiting for the Deployment", 0, 0)
    dstatus = deployment.get("status") or {}
    pods = _live(pods)
    # The pods are fresher than the Deployment's counts (its controller lags behind the
    # kubelet), so a ready pod counts even before the Deployment's status says so.
    replicas = max(int(dstatus.get("replicas") or 0), len(pods))
    ready = max(int(dstatus.get("readyReplicas") or 0), sum(_pod_ready(p) for p in pods))
    updated = int(dstatus.get("updatedReplicas") or 0)
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = dstatus.get("observedGeneration")
    rolling = (generation is not None and observed is not None and observed < generation) or (
        "updatedReplicas" in dstatus and updated < desired
    )
    failures = [f for f in (pod_failure(p) for p in pods) if f is not None]
    failure = failures[0] if failures else _deployment_failure(deployment)
    counts = f"{ready}/{desired} replicas ready"

    if desired == 0:
        return Observation(PENDING, "ScaledToZero", "replicas is 0", replicas, ready, rolling)
    if ready >= desired:
        return Observation(READY, "AllReplicasReady", counts, replicas, ready, rolling)
    if ready > 0:
        reason, message = "ReplicasNotReady", counts
        if failure is not None:
            reason, message = failure.reason, f"{counts}; {failure.message}"
        return Observation(DEGRADED, reason, message, replicas, ready, rolling)
    if failure is not None:
        return Observation(FAILED, failure.reason, failure.message, replicas, ready, rolling)
    stages = {pod_stage(p) for p in pods}
    if LOADING in stages or READY in stages:
        return Observation(LOADING, "Loading", "the server is loading the model", replicas, 0)
    if HARVESTING in stages:
        return Observation(HARVESTING, "Harvesting", "fetching the model files", replicas, 0)
    message = _unschedulable(pods) or "waiting for pods to start"
    return Observation(PENDING, "PodsPending", message, replicas, 0, rolling)


def _conditions(obs: Observation, generation: int | None) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded as (status, reason, message) from one observation."""
    progressing_phases = {PENDING, HARVESTING, LOADING}
    if obs.phase == READY:
        ready = ("True", obs.reason, obs.message)
    else:
        ready = ("False", obs.reason, obs.message)
    if obs.phase in progressing_phases and obs.reason != "ScaledToZero":
        progressing = ("True", obs.reason, obs.message)
    elif obs.rolling and obs.phase != FAILED:
        progressing = ("True", "RollingUpdate", "pods are being replaced with the new spec")
    elif obs.phase == FAILED:
        progressing = ("False", obs.reason, obs.message)
    else:
        progressing = ("False", "Complete" if obs.phase == READY else obs.reason, obs.message)
    if obs.phase in {DEGRADED, FAILED}:
        degraded = ("True", obs.reason, obs.message)
    else:
        degraded = ("False", "AsExpected", "no failing replicas")
    result = []
    for kind, (status, reason, message) in (
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ):
        cond: dict[str, Any] = {"type": kind, "status": status, "reason": reason}
        cond["message"] = message
        if generation is not None:
            cond["observedGeneration"] = generation
        result.append(cond)
    return result


def build_status(
    spec: ModelDeploymentSpec,
    obs: Observation,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The full `status` to write; a condition keeps its lastTransitionTime unless it flips."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    conditions = []
    for cond in _conditions(obs, spec.generation):
        before = old.get(cond["type"])
        same = before is not None and before.get("status") == cond["status"]
        cond["lastTransitionTime"] = (
            before.get("lastTransitionTime", now) if same and before else now
        )
        conditions.append(cond)
    status: dict[str, Any] = {
        "phase": obs.phase,
        "message": obs.message,
        "replicas": obs.replicas,
        "readyReplicas": obs.ready_replicas,
        "endpoint": spec.endpoint,
        "selector": labels.selector_string(spec.name),
        "conditions": conditions,
    }
    if spec.generation is not None:
        status["observedGeneration"] = spec.generation
    status["slug"] = spec.slug
    return status


def failed_status(spec_name: str, generation: int | None, message: str, now: str) -> dict:
    """Status for an object whose spec cannot be built at all (the message names the field)."""
    conditions = [
        {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": message},
        {"type": "Progressing", "status": "False", "reason": "InvalidSpec", "message": message},
        {"type": "Degraded", "status": "True", "reason": "InvalidSpec", "message": message},
    ]
    for cond in conditions:
        cond["lastTransitionTime"] = now
        if generation is not None:
            cond["observedGeneration"] = generation
    status: dict[str, Any] = {
        "phase": FAILED,
        "message": message,
        "selector": labels.selector_string(spec_name),
        "conditions": conditions,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` changes anything (transition times follow the statuses)."""
    return any((old or {}).get(k) != v for k, v in new.items())
