"""The pure status computation: what the kubelet reports in, phase and conditions out."""

from __future__ import annotations

import pytest
from kube import pods
from modeldeploy.operator import builders, status
from modeldeploy.operator.spec import parse_spec

NOW = "2026-02-02T02:02:02Z"


def _spec(replicas: int = 1):
    return parse_spec(
        {
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 4},
            "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": replicas},
        },
        default_image="img",
    )


def _observe(replicas: int, ready: int, *pod_statuses, deployment_extra=None):
    spec = _spec(replicas)
    deployment = builders.build_deployment(spec)
    deployment["metadata"]["generation"] = 1
    deployment["status"] = pods.deployment_status(replicas=len(pod_statuses), ready=ready)
    if deployment_extra:
        deployment["status"].update(deployment_extra)
    items = []
    for index, pod_status in enumerate(pod_statuses):
        pod = pods.pod_for(deployment, index)
        pod["status"] = pod_status
        items.append(pod)
    return spec, status.observe(spec, deployment, items)


def test_no_deployment_yet_is_pending() -> None:
    obs = status.observe(_spec(), None, [])
    assert (obs.phase, obs.ready_replicas) == ("Pending", 0)


def test_no_pods_yet_is_pending() -> None:
    _, obs = _observe(1, 0)
    assert obs.phase == "Pending"
    assert obs.message == "waiting for pods to start"


@pytest.mark.parametrize(
    ("pod_status", "phase"),
    [(pods.harvesting(), "Harvesting"), (pods.loading(), "Loading"), (pods.ready(), "Ready")],
    ids=["harvest-running", "server-loading", "ready"],
)
def test_single_pod_stages(pod_status, phase) -> None:
    _, obs = _observe(1, 1 if phase == "Ready" else 0, pod_status)
    assert obs.phase == phase


def test_loading_wins_over_harvesting_across_pods() -> None:
    _, obs = _observe(2, 0, pods.harvesting(), pods.loading())
    assert obs.phase == "Loading"


def test_some_ready_is_degraded_with_counts() -> None:
    _, obs = _observe(2, 1, pods.ready(), pods.loading())
    assert obs.phase == "Degraded"
    assert obs.message == "1/2 replicas ready"
    assert obs.ready_replicas == 1


def test_degraded_names_the_failing_replica() -> None:
    _, obs = _observe(2, 1, pods.ready(), pods.server_crashloop("CUDA out of memory"))
    assert obs.phase == "Degraded"
    assert obs.reason == "CrashLoopBackOff"
    assert "CUDA out of memory" in obs.message


def test_harvest_error_is_failed_with_its_termination_message() -> None:
    message = "hf://nope/missing: repository not found (404)"
    _, obs = _observe(1, 0, pods.harvest_failed(message))
    assert obs.phase == "Failed"
    assert obs.reason == "HarvestFailed"
    assert obs.message == f"harvest: {message}"


def test_server_crash_loop_is_failed_with_its_message() -> None:
    _, obs = _observe(1, 0, pods.server_crashloop("model.safetensors: truncated shard"))
    assert (obs.phase, obs.reason) == ("Failed", "CrashLoopBackOff")
    assert obs.message == "server: model.safetensors: truncated shard"


def test_crash_loop_without_termination_message_names_the_exit_code() -> None:
    pod_status = pods.server_crashloop("")
    _, obs = _observe(1, 0, pod_status)
    assert obs.phase == "Failed"
    assert "exit code 1" in obs.message


def test_bad_input_exit_is_failed_at_once() -> None:
    """Exit 2 is modeldeploy's "bad input": restarting cannot fix it."""
    _, obs = _observe(1, 0, pods.server_exited(2, "model.gguf: unsupported architecture 'rwkv'"))
    assert (obs.phase, obs.reason) == ("Failed", "Error")
    assert obs.message == "server: model.gguf: unsupported architecture 'rwkv'"
    _, obs = _observe(1, 0, pods.harvest_exited(2, "hf://x/y: repository not found"))
    assert (obs.phase, obs.reason) == ("Failed", "HarvestFailed")
    assert obs.message == "harvest: hf://x/y: repository not found"


def test_retry_of_a_bad_input_harvest_stays_failed() -> None:
    """A re-run of a harvest that exited 2 on the same input must not flip back to Harvesting."""
    _, obs = _observe(1, 0, pods.harvest_retrying(2, "hf://x/y: repository not found"))
    assert (obs.phase, obs.reason) == ("Failed", "HarvestFailed")
    assert obs.message == "harvest: hf://x/y: repository not found"
    # A retry after a transient failure (exit 1: network) is real progress.
    _, obs = _observe(1, 0, pods.harvest_retrying(1, "connection reset"))
    assert obs.phase == "Harvesting"


def test_a_single_kill_is_not_a_failure() -> None:
    """SIGKILL (137) or a crash: the kubelet restarts the container; only a back-off fails."""
    _, obs = _observe(1, 0, pods.server_exited(137))
    assert obs.phase == "Loading"
    _, obs = _observe(2, 1, pods.ready(), pods.server_exited(137))
    assert (obs.phase, obs.message) == ("Degraded", "1/2 replicas ready")
    _, obs = _observe(1, 0, pods.harvest_exited(1, "connection reset"))
    assert obs.phase != "Failed"


def test_image_pull_backoff_is_failed() -> None:
    _, obs = _observe(1, 0, pods.image_pull_backoff("registry.test/nope:1"))
    assert (obs.phase, obs.reason) == ("Failed", "ImagePullBackOff")
    assert "registry.test/nope:1" in obs.message


def test_unschedulable_pod_stays_pending_and_says_why() -> None:
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    _, obs = _observe(1, 0, pods.unschedulable(why))
    assert obs.phase == "Pending"
    assert why in obs.message


def test_progress_deadline_exceeded_is_failed() -> None:
    extra = {
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "demo-1" has timed out progressing.',
            }
        ]
    }
    _, obs = _observe(1, 0, pods.loading(), deployment_extra=extra)
    assert (obs.phase, obs.reason) == ("Failed", "ProgressDeadlineExceeded")


def test_terminating_pods_are_ignored() -> None:
    spec = _spec(1)
    deployment = builders.build_deployment(spec)
    deployment["status"] = pods.deployment_status(replicas=1, ready=0)
    dying = pods.pod_for(deployment, 0)
    dying["metadata"]["deletionTimestamp"] = NOW
    dying["status"] = pods.server_crashloop("old pod")
    fresh = pods.pod_for(deployment, 1)
    fresh["status"] = pods.loading()
    assert status.observe(spec, deployment, [dying, fresh]).phase == "Loading"


def test_ready_pods_count_before_the_deployment_status_catches_up() -> None:
    spec = _spec(2)
    deployment = builders.build_deployment(spec)
    items = []
    for index in range(2):
        pod = pods.pod_for(deployment, index)
        pod["status"] = pods.ready()
        items.append(pod)
    obs = status.observe(spec, deployment, items)
    assert (obs.phase, obs.replicas, obs.ready_replicas, obs.rolling) == ("Ready", 2, 2, False)


def test_scaled_to_zero() -> None:
    _, obs = _observe(0, 0)
    assert (obs.phase, obs.reason) == ("Pending", "ScaledToZero")


def test_long_messages_are_cut() -> None:
    _, obs = _observe(1, 0, pods.server_crashloop("x" * 5000))
    assert len(obs.message) <= status.MAX_MESSAGE
    assert obs.message.endswith("...")


def test_status_fields_and_conditions() -> None:
    spec, obs = _observe(1, 1, pods.ready())
    built = status.build_status(spec, obs, None, NOW)
    assert built["phase"] == "Ready"
    assert (built["replicas"], built["readyReplicas"]) == (1, 1)
    assert built["observedGeneration"] == 4
    assert built["endpoint"] == "http://demo.ml.svc.cluster.local"
    assert built["selector"] == "app.kubernetes.io/instance=demo,app.kubernetes.io/name=modeldeploy"
    assert built["slug"] == spec.slug
    conditions = {c["type"]: c for c in built["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Progressing"]["reason"] == "Complete"
    assert conditions["Degraded"]["status"] == "False"
    assert all(c["lastTransitionTime"] == NOW for c in built["conditions"])
    assert all(c["observedGeneration"] == 4 for c in built["conditions"])


def test_failed_conditions() -> None:
    spec, obs = _observe(1, 0, pods.harvest_failed("no such repo"))
    conditions = {c["type"]: c for c in status.build_status(spec, obs, None, NOW)["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "True"
    assert conditions["Degraded"]["reason"] == "HarvestFailed"
    assert "no such repo" in conditions["Degraded"]["message"]
    assert conditions["Progressing"]["status"] == "False"


def test_transition_time_moves_only_when_a_condition_flips() -> None:
    spec, loading = _observe(1, 0, pods.loading())
    first = status.build_status(spec, loading, None, "2026-01-01T00:00:00Z")
    _, harvesting = _observe(1, 0, pods.harvesting())
    second = status.build_status(spec, harvesting, first, "2026-01-01T00:01:00Z")
    assert {c["type"]: c["lastTransitionTime"] for c in second["conditions"]} == {
        "Ready": "2026-01-01T00:00:00Z",
        "Progressing": "2026-01-01T00:00:00Z",
        "Degraded": "2026-01-01T00:00:00Z",
    }
    _, ready = _observe(1, 1, pods.ready())
    third = status.build_status(spec, ready, second, "2026-01-01T00:02:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times["Ready"] == times["Progressing"] == "2026-01-01T00:02:00Z"
    assert times["Degraded"] == "2026-01-01T00:00:00Z"
    assert not status.status_changed(third, third)
    assert status.status_changed(second, third)
