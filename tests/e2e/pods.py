"""One pod on the fake node: its sync loop, probes, Events and status (the kubelet's part).

A PodRunner runs the init containers in order, then the containers, as local
processes (`launch.py` translates each container, `containers.py` runs it), executes
the probes as declared (startup gates readiness and liveness; a startup or liveness
probe that fails `failureThreshold` times in a row kills the container with
SIGTERM, SIGKILL after the grace period, and it is restarted), posts the kubelet's
Events (Started, Unhealthy, Killing, BackOff) and writes the pod's status whenever it
changes. A PersistentVolumeClaim that does not exist keeps the pod Pending
(Unschedulable), as the scheduler would.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from e2e.containers import Container, kill_group
from e2e.launch import POD_IP, ContainerConfigError, Launch, build_launch, free_port
from e2e.probes import Probe
from e2e.timing import TICK_S, now

if TYPE_CHECKING:
    from e2e.kubelet import FakeKubelet

NODE_NAME = "fake-node"


class PodRunner:
    """Runs one pod in a thread until the pod is deleted or the kubelet stops."""

    def __init__(self, kubelet: FakeKubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.namespace, self.name = meta["namespace"], meta["name"]
        self.dir = kubelet.root / "pods" / f"{self.namespace}_{self.name}"
        spec = pod["spec"]
        self.grace = float(spec.get("terminationGracePeriodSeconds", 30))
        self.inits = [Container(c, True, self.dir) for c in spec.get("initContainers") or []]
        self.mains = [Container(c, False, self.dir) for c in spec.get("containers") or []]
        self.port_map = {
            int(p["containerPort"]): free_port()
            for c in spec.get("containers") or []
            for p in c.get("ports") or []
        }
        self.volumes: dict[str, Path] | None = None
        self.unschedulable = ""
        self.start_time = now()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._published: dict[str, Any] | None = None
        self._client = httpx.Client(base_url=kubelet.url, timeout=10)
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    # ---- public view -----------------------------------------------------------------

    @property
    def containers(self) -> dict[str, Container]:
        return {c.name: c for c in [*self.inits, *self.mains]}

    def local_port(self, name_or_number: str | int) -> int:
        """The local port of a container port of this pod (by name or containerPort)."""
        for container in self.mains:
            for port in container.spec.get("ports") or []:
                if str(name_or_number) in (port.get("name"), str(port["containerPort"])):
                    return self.port_map[int(port["containerPort"])]
        raise KeyError(f"pod {self.name} has no container port {name_or_number!r}")

    @property
    def ready(self) -> bool:
        return bool(self.mains) and all(c.ready for c in self.mains)

    def dry_run(self) -> dict[str, Launch | dict[str, Any]]:
        """Each container's Launch (or its waiting state) as the kubelet would build it now.

        Nothing is started; lets a test check the translation of a pod spec.
        """
        self.volumes = self._resolve_volumes()
        if self.volumes is None:
            raise ContainerConfigError(self.unschedulable)
        out: dict[str, Launch | dict[str, Any]] = {}
        for container in [*self.inits, *self.mains]:
            launch = self._launch(container)
            out[container.name] = launch if launch is not None else container.state
        return out

    def close(self) -> None:
        """Release the API client of a runner that was never started."""
        self._client.close()

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> PodRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once the pod is being (or has been) stopped."""
        return self._stop.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step(time.monotonic())
                try:
                    self._publish()
                except httpx.HTTPError as exc:  # retried on the next tick
                    self.error = exc
                self._stop.wait(TICK_S)
        finally:
            self._terminate_all()
            self._client.close()

    def _terminate_all(self) -> None:
        at = time.monotonic()
        for container in [*self.inits, *self.mains]:
            container.kill(self.grace, at)
        deadline = at + self.grace
        for container in [*self.inits, *self.mains]:
            if container.proc is None:
                continue
            try:
                container.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(container.proc, signal.SIGKILL)
                container.proc.wait(10)

    # ---- the kubelet's sync loop, one tick -------------------------------------------

    def _resolve_volumes(self) -> dict[str, Path] | None:
        volumes: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "emptyDir" in volume:
                volumes[name] = self.dir / "volumes" / name
                volumes[name].mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if not self.kubelet.claim_exists(self.namespace, claim):
                    self.unschedulable = (
                        f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found.'
                    )
                    return None
                volumes[name] = self.kubelet.claim_dir(self.namespace, claim)
            else:
                kinds = sorted(k for k in volume if k != "name")
                raise ContainerConfigError(f"volume {name}: {kinds} not supported")
        self.unschedulable = ""
        return volumes

    def _launch(self, container: Container) -> Launch | None:
        assert self.volumes is not None
        try:
            launch = build_launch(
                container.spec,
                self.pod,
                self.volumes,
                self.port_map,
                self.dir / "containers" / container.name,
                self.kubelet.read_object,
            )
        except ContainerConfigError as exc:
            container.state = {
                "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
            }
            return None
        return launch

    def _run_container(self, container: Container, at: float) -> None:
        """Start, watch, restart one container; run its probes."""
        if container.proc is not None and container.proc.poll() is not None:
            container.finish(at)
            return  # publish the terminated state before the restart, as the kubelet does
        if container.proc is None:
            if container.completed:
                return
            backing_off = (container.state.get("waiting") or {}).get("reason") == "CrashLoopBackOff"
            if container.waiting_for_backoff(at, self.name):
                if not backing_off:
                    self._event(
                        container, "Warning", "BackOff", "Back-off restarting failed container"
                    )
                return
            if "terminated" in container.state:
                container.last_state = container.state
            launch = self._launch(container)
            if launch is not None:
                container.start(launch, at)
                self._event(container, "Normal", "Started", f"Started container {container.name}")
            return
        container.enforce_kill(at)
        if container.kill_deadline is not None or container.launch is None:
            return
        self._probe(container, at)

    def _probe(self, container: Container, at: float) -> None:
        assert container.launch is not None
        ports = container.launch.ports
        startup = container.probes.get("startupProbe")
        if not container.started:
            if startup is None:
                container.started = True
            elif startup.due(at):
                if startup.run(ports, at):
                    container.started = True
                    for kind in ("readinessProbe", "livenessProbe"):
                        if kind in container.probes:
                            container.probes[kind].next_due = at
                elif startup.failures >= startup.threshold:
                    self._unhealthy(container, "Startup", startup, at)
                    return
            if not container.started:
                return
        readiness = container.probes.get("readinessProbe")
        if readiness is None:
            container.ready = True
        elif readiness.due(at):
            if readiness.run(ports, at) and readiness.passing:
                container.ready = True
            elif readiness.failures >= readiness.threshold:
                container.ready = False
        liveness = container.probes.get("livenessProbe")
        if liveness is not None and liveness.due(at):
            alive = liveness.run(ports, at)
            if not alive and liveness.failures >= liveness.threshold:
                container.ready = False
                self._unhealthy(container, "Liveness", liveness, at)

    def _unhealthy(self, container: Container, kind: str, probe: Probe, at: float) -> None:
        """A startup or liveness probe failed `failureThreshold` times: kill, to be restarted."""
        self._event(container, "Warning", "Unhealthy", f"{kind} probe failed: {probe.last_error}")
        self._event(
            container,
            "Normal",
            "Killing",
            f"Container {container.name} failed {kind.lower()} probe, will be restarted",
        )
        container.kill(self.grace, at)

    def _event(self, container: Container, kind: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about this pod, as the kubelet does (best effort)."""
        stamp = now()
        group = "initContainers" if container.init else "containers"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": self.namespace,
                "name": self.name,
                "uid": self.pod["metadata"].get("uid", ""),
                "fieldPath": f"spec.{group}{{{container.name}}}",
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": NODE_NAME},
            "reportingComponent": "kubelet",
            "reportingInstance": NODE_NAME,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        with contextlib.suppress(httpx.HTTPError):
            self._client.post(f"/api/v1/namespaces/{self.namespace}/events", json=event)

    def _step(self, at: float) -> None:
        if self.volumes is None:
            try:
                self.volumes = self._resolve_volumes()
            except ContainerConfigError as exc:
                for container in self.inits + self.mains:
                    container.state = {
                        "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
                    }
                return
            if self.volumes is None:
                return
        for container in self.inits:
            if not container.completed:
                self._run_container(container, at)
                return
        for container in self.mains:
            self._run_container(container, at)

    # ---- status ----------------------------------------------------------------------

    def pod_status(self) -> dict[str, Any]:
        def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
            if reason:
                out["reason"] = reason
            if message:
                out["message"] = message
            return out

        if self.volumes is None and self.unschedulable:
            return {
                "phase": "Pending",
                "conditions": [cond("PodScheduled", False, "Unschedulable", self.unschedulable)],
            }
        initialized = all(c.completed for c in self.inits)
        ready = initialized and self.ready
        ran = initialized and any(c.instances for c in self.mains)
        return {
            "phase": "Running" if ran else "Pending",
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", initialized, "" if initialized else "ContainersNotInitialized"),
                cond("ContainersReady", ready, "" if ready else "ContainersNotReady"),
                cond("Ready", ready, "" if ready else "ContainersNotReady"),
            ],
            "initContainerStatuses": [c.status() for c in self.inits],
            "containerStatuses": [c.status() for c in self.mains],
        }

    def _publish(self) -> None:
        status = self.pod_status()
        if status == self._published:
            return
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        response = self._client.patch(
            path,
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code == 404:
            self._stop.set()  # the pod is gone: stop its containers
            return
        response.raise_for_status()
        self._published = status
        self.kubelet.wake()
