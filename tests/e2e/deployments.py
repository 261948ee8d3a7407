"""The Deployment controller's part of the fake node: pods for each Deployment, and its status.

For each Deployment it keeps `spec.replicas` pods of the current template (label
`pod-template-hash`, an ownerReference to the Deployment — there are no
ReplicaSets), deletes the pods of an older template once as many new ones are ready
(all new pods at once: maxSurge/maxUnavailable are not followed), deletes extra pods
on scale-down (not-ready, then newest first), and writes `status` as the real
controller does (replicas, updatedReplicas, readyReplicas, availableReplicas,
unavailableReplicas, observedGeneration, Available/Progressing conditions). Pods
whose owning Deployment is gone are deleted: the ownerReference cascade, for an
emulator run without garbage collection.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from e2e.informer import Key
from e2e.pods import NODE_NAME
from e2e.timing import now

TEMPLATE_HASH_LABEL = "pod-template-hash"


def template_hash(template: Mapping[str, Any]) -> str:
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _resource_version(obj: Mapping[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


class DeploymentController:
    """Reconciles Deployments into pods through the API (`client` has the emulator's URL)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self._expected: dict[str, set[str]] = {}  # deployment uid -> created, not yet seen
        self._deleting: set[Key] = set()

    def reconcile(
        self, deployments: Iterable[dict[str, Any]], pods: Mapping[Key, dict[str, Any]]
    ) -> None:
        """One pass over every Deployment and every pod (level-based, like the real one)."""
        deployments = list(deployments)
        for key in [k for k in self._deleting if k not in pods]:
            self._deleting.discard(key)
        for deployment in deployments:
            if not deployment["metadata"].get("deletionTimestamp"):
                self._sync(deployment, pods)
        uids = {d["metadata"]["uid"] for d in deployments}
        for key, pod in pods.items():
            owners = pod["metadata"].get("ownerReferences") or []
            orphan = any(o.get("kind") == "Deployment" for o in owners) and not any(
                o.get("uid") in uids for o in owners
            )
            if orphan:
                self._delete_pod(key)

    def _owned(
        self, deployment: Mapping[str, Any], pods: Mapping[Key, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        uid = deployment["metadata"]["uid"]
        owned = [
            p
            for k, p in pods.items()
            if k not in self._deleting
            and not p["metadata"].get("deletionTimestamp")
            and any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])
        ]
        return sorted(owned, key=_resource_version)

    def _sync(self, deployment: dict[str, Any], pods: Mapping[Key, dict[str, Any]]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        namespace = meta["namespace"]
        desired = int(spec.get("replicas", 1))
        current_hash = template_hash(spec["template"])
        owned = self._owned(deployment, pods)
        expected = self._expected.setdefault(meta["uid"], set())
        expected -= {p["metadata"]["name"] for p in owned}
        labels = [(p, p["metadata"].get("labels") or {}) for p in owned]
        new = [p for p, lb in labels if lb.get(TEMPLATE_HASH_LABEL) == current_hash]
        old = [p for p in owned if p not in new]
        for _ in range(desired - len(new) - len(expected)):
            expected.add(self._create_pod(deployment, current_hash))
        if len(new) > desired:
            extra = sorted(new, key=lambda p: (pod_ready(p), -_resource_version(p)))
            for pod in extra[: len(new) - desired]:
                self._delete_pod((namespace, pod["metadata"]["name"]))
        if old and sum(pod_ready(p) for p in new) >= desired:
            for pod in old:
                self._delete_pod((namespace, pod["metadata"]["name"]))
        self._write_status(deployment, owned, new, desired)

    def _create_pod(self, deployment: Mapping[str, Any], pod_hash: str) -> str:
        meta, template = deployment["metadata"], deployment["spec"]["template"]
        name = f"{meta['name']}-{pod_hash}-{secrets.token_hex(3)[:5]}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": {
                    **(template["metadata"].get("labels") or {}),
                    TEMPLATE_HASH_LABEL: pod_hash,
                },
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**template["spec"], "nodeName": NODE_NAME},
        }
        response = self.client.post(f"/api/v1/namespaces/{meta['namespace']}/pods", json=pod)
        response.raise_for_status()
        return name

    def _delete_pod(self, key: Key) -> None:
        if key in self._deleting:
            return
        self._deleting.add(key)
        response = self.client.delete(f"/api/v1/namespaces/{key[0]}/pods/{key[1]}")
        if response.status_code not in (200, 202, 404):
            response.raise_for_status()

    def _write_status(
        self,
        deployment: Mapping[str, Any],
        owned: list[dict[str, Any]],
        new: list[dict[str, Any]],
        desired: int,
    ) -> None:
        meta = deployment["metadata"]
        ready = sum(pod_ready(p) for p in owned)
        complete = len(new) == desired and sum(pod_ready(p) for p in new) == desired
        previous = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []}

        def cond(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
            before = previous.get(kind) or {}
            status = "True" if ok else "False"
            same = before.get("status") == status
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": before.get("lastTransitionTime", now()) if same else now(),
            }

        available = ready >= desired
        replica_set = f"{meta['name']}-{template_hash(deployment['spec']['template'])}"
        counts = {
            "replicas": len(owned),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(len(owned) - ready, desired - ready, 0),
        }
        status: dict[str, Any] = {
            "observedGeneration": meta.get("generation", 1),
            # the API server omits zero counts
            **{k: v for k, v in counts.items() if v},
            "conditions": [
                cond(
                    "Available",
                    available,
                    "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                    "Deployment has minimum availability."
                    if available
                    else "Deployment does not have minimum availability.",
                ),
                cond(
                    "Progressing",
                    True,
                    "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                    f'ReplicaSet "{replica_set}" '
                    + ("has successfully progressed." if complete else "is progressing."),
                ),
            ],
        }
        old = dict(deployment.get("status") or {})
        if old == status:
            return
        patch = {**{k: None for k in old if k not in status}, **status}
        response = self.client.patch(
            f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}/status",
            json={"status": patch},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code != 404:
            response.raise_for_status()
