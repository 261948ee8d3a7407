"""A fake node for the strict emulator: Deployment controller + kubelet, running real processes.

On a real cluster the Deployment controller makes pods and the kubelet runs them.
Here `FakeKubelet` does both for the Deployments in the emulator, so the e2e tests
exercise the Deployment *as the operator generated it*. It watches Deployments and
pods (`informer.py`) and on every change:

* makes and deletes pods, and writes each Deployment's status (`deployments.py`);
* runs every pod in its own thread (`pods.py`): init containers in order, then the
  containers, as local processes (`launch.py` translates env, Secrets, volumes,
  ports; `containers.py` runs, restarts and reports a container; `probes.py` probes
  it), writing pod status and the kubelet's Events back into the emulator;
* stops a pod's processes when the pod (or, through the ownerReference cascade, its
  Deployment) is deleted: SIGTERM, then SIGKILL after terminationGracePeriodSeconds.

Time scale: every *period* (probe periods, back-off delays) is multiplied by
`timing.TIME_SCALE` (env MODELDEPLOY_E2E_TIME_SCALE, default 0.2), so a 10 s probe
period takes 2 s; failure thresholds, probe timeouts and grace periods are kept as
declared, so the probe logic (how many failures kill a container, how many probe
periods a startup may take) is exactly the manifest's.

Not emulated: images (every container runs this checkout's virtualenv with
Dockerfile.server's ENV), users and security contexts (processes run as the test
user; a read-only root is not enforced), resources and limits, scheduling
constraints (nodeSelector, tolerations, affinity), ReplicaSets (pods are owned
directly by the Deployment), exec probes, volume kinds other than emptyDir and
persistentVolumeClaim (a claim is one host directory shared by all its pods, like a
ReadWriteMany volume). Because mount paths are rewritten to host directories,
anything a process derives from a path string differs from a real pod's (e.g. the
hash part of the slug of a `file:///models/...` source).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from e2e.deployments import DeploymentController
from e2e.informer import Informer, Key
from e2e.pods import PodRunner

DEPLOYMENTS_PATH = "/apis/apps/v1/deployments"
PODS_PATH = "/api/v1/pods"


class FakeKubelet:
    """Deployment controller + kubelet for the emulator at `url`; files under `root`."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.runners: dict[Key, PodRunner] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=url, timeout=10)
        self.controller = DeploymentController(self._client)
        self.deployments = Informer(url, DEPLOYMENTS_PATH, listener=lambda *_: self.wake())
        self.pods = Informer(url, PODS_PATH, listener=lambda *_: self.wake())
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self.error: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> FakeKubelet:
        self.root.mkdir(parents=True, exist_ok=True)
        self.deployments.start()
        self.pods.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(30)
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop()
        self.deployments.stop(wait=False)
        self.pods.stop(wait=False)
        for runner in runners:
            runner.join(60)
        self.deployments.stop()
        self.pods.stop()
        self._client.close()

    def wake(self) -> None:
        self._wake.set()

    # ---- helpers for pods and tests -----------------------------------------------------

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind PersistentVolumeClaim `claim` (shared by all its pods)."""
        path = self.root / "claims" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def read_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        response = self._client.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def claim_exists(self, namespace: str, claim: str) -> bool:
        return self.read_object("persistentvolumeclaims", namespace, claim) is not None

    def pods_of(self, namespace: str, deployment: str) -> list[PodRunner]:
        """The live pods of a Deployment (by their owner reference), oldest first."""
        with self._lock:
            return [
                r
                for (ns, _name), r in self.runners.items()
                if ns == namespace
                and not r.stopping
                and any(
                    o.get("kind") == "Deployment" and o.get("name") == deployment
                    for o in r.pod["metadata"].get("ownerReferences") or []
                )
            ]

    def all_runners(self) -> list[PodRunner]:
        with self._lock:
            return list(self.runners.values())

    def ready_ports(self, namespace: str, selector: Mapping[str, str], port: str) -> list[int]:
        """Local ports of the ready pods matching `selector` (a Service's endpoints)."""
        ports = []
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            labels = runner.pod["metadata"].get("labels") or {}
            if runner.namespace != namespace or runner.stopping or not runner.ready:
                continue
            if all(labels.get(k) == v for k, v in selector.items()):
                with contextlib.suppress(KeyError):
                    ports.append(runner.local_port(port))
        return ports

    # ---- the controller loop ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._reconcile()
            except Exception as exc:  # kept for the test's failure message; retried next wake
                self.error = exc

    def _reconcile(self) -> None:
        pods = self.pods.snapshot()
        self.controller.reconcile(self.deployments.snapshot().values(), pods)
        self._sync_runners(pods)

    def _sync_runners(self, pods: Mapping[Key, dict[str, Any]]) -> None:
        with self._lock:
            for key, pod in pods.items():
                if key not in self.runners and not pod["metadata"].get("deletionTimestamp"):
                    self.runners[key] = PodRunner(self, pod).start()
            for key, runner in list(self.runners.items()):
                gone = key not in pods or pods[key]["metadata"].get("deletionTimestamp")
                if gone and not runner.stopping:
                    runner.stop()
