"""A fake node for the strict emulator: Deployment controller + kubelet, running real processes.

On a real cluster the Deployment controller makes pods and the kubelet runs them.
Here `FakeKubelet` does both for the Deployments in the emulator, so the e2e
tests exercise the Deployment *as the operator generated it*:

* Deployment controller: for each Deployment, keeps `spec.replicas` pods of the
  current template (label `pod-template-hash`, ownerReference to the Deployment),
  replaces pods of an older template once the new ones are ready (all new pods at
  once: maxSurge/maxUnavailable are not followed), deletes extra
  pods on scale-down (not-ready ones first), writes `status` (replicas,
  updatedReplicas, readyReplicas, availableReplicas, unavailableReplicas,
  observedGeneration, Available/Progressing conditions). Pods whose owning
  Deployment is gone are deleted (the ownerReference cascade, for emulators run
  without garbage collection).
* kubelet: per pod, the init containers in order, then the containers, each as a
  local process (see `containers.py` for env, secrets, volumes, ports); restart
  policy Always with the kubelet's back-off (first restart at once, then 10 s, 20 s,
  ... capped at 300 s, i.e. CrashLoopBackOff); startup, readiness and liveness
  probes with their declared path, port, initial delay, period, timeout, success and
  failure thresholds (startup gates the other two; a failed startup or liveness probe kills the
  container with SIGTERM, SIGKILL after the grace period, and restarts it); the
  termination message from the container's terminationMessagePath, falling back to
  the last 80 log lines (2048 bytes) under `FallbackToLogsOnError`; pod status with
  phase, PodScheduled/Initialized/ContainersReady/Ready conditions, init-container
  and container states, `started`, `ready`, `restartCount`, `lastState`; pod Events
  as the kubelet posts them (Started, Unhealthy, Killing, BackOff).
  A pod whose PersistentVolumeClaim does not exist stays Pending, Unschedulable.
  Deleting a pod (or its Deployment) stops its processes: SIGTERM, then SIGKILL
  after terminationGracePeriodSeconds.

Time scale: every *period* (probe periods, back-off delays) is multiplied by
`TIME_SCALE` (env MODELDEPLOY_E2E_TIME_SCALE, default 0.2) so a 10 s probe period
takes 2 s; failure thresholds, probe timeouts and grace periods are kept as
declared, so the probe logic (how many failures kill a container, how long a
startup may take in probe periods) is exactly the manifest's.

Not emulated: images (every container runs this checkout's virtualenv with
Dockerfile.server's ENV), users and security contexts (processes run as the test
user; read-only root is not enforced), resources/limits, scheduling constraints
(nodeSelector, tolerations, affinity), ReplicaSets (pods are owned directly by the
Deployment), exec probes, volume kinds other than emptyDir and
persistentVolumeClaim (each claim is one host directory shared by all pods, like
a ReadWriteMany volume). Because mount paths are rewritten to host directories,
anything a process derives from a path string differs from a real pod's (e.g. the
hash part of the slug of a `file:///models/...` source).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from e2e.containers import POD_IP, ContainerConfigError, Launch, build_launch, free_port
from e2e.informer import Informer, Key

TIME_SCALE = float(os.environ.get("MODELDEPLOY_E2E_TIME_SCALE", "0.2"))
TICK_S = 0.05
#: kubelet's container restart back-off: initial and maximum delay (seconds, unscaled).
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0
#: A container that ran this long (unscaled) without dying resets its back-off.
BACKOFF_RESET_S = 600.0
#: FallbackToLogsOnError: the last lines / bytes of the log become the message.
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
#: The termination message file is read up to this many bytes.
MESSAGE_BYTES = 4096
TEMPLATE_HASH_LABEL = "pod-template-hash"
DEPLOYMENTS_PATH = "/apis/apps/v1/deployments"
PODS_PATH = "/api/v1/pods"
NODE_NAME = "fake-node"
#: If the test process dies without cleaning up (SIGKILL, a crash), the kernel kills the
#: containers too: util-linux `setpriv --pdeathsig KILL` execs the container's command.
SETPRIV = shutil.which("setpriv")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_hash(template: Mapping[str, Any]) -> str:
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _exit_code(returncode: int) -> int:
    """A container's exit code: a signal N is 128+N, as the runtime reports it."""
    return 128 - returncode if returncode < 0 else returncode


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    lines = data.splitlines()[-FALLBACK_LINES:]
    return b"\n".join(lines)[-FALLBACK_BYTES:].decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class Probe:
    """One probe of one container instance, with the kubelet's counters."""

    spec: Mapping[str, Any]
    next_due: float = 0.0
    failures: int = 0
    successes: int = 0
    last_error: str = ""

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10)) * TIME_SCALE

    @property
    def threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    def due(self, at: float) -> bool:
        return at >= self.next_due

    def run(self, ports: Mapping[str, int], at: float) -> bool:
        """Execute the probe now; True on success. Schedules the next run."""
        self.next_due = at + self.period
        timeout = float(self.spec.get("timeoutSeconds", 1))
        if "httpGet" in self.spec:
            get = self.spec["httpGet"]
            port = ports.get(str(get.get("port")))
            if port is None:
                ok, self.last_error = False, f"no container port {get.get('port')}"
            else:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                try:
                    response = httpx.get(
                        f"http://{POD_IP}:{port}{get.get('path', '/')}",
                        headers=headers,
                        timeout=timeout,
                    )
                    ok = 200 <= response.status_code < 400
                    self.last_error = f"HTTP probe failed with statuscode: {response.status_code}"
                except httpx.HTTPError as exc:
                    ok, self.last_error = False, f"Get {get.get('path', '/')}: {exc}"
        elif "tcpSocket" in self.spec:
            port = ports.get(str(self.spec["tcpSocket"].get("port")))
            try:
                with socket.create_connection((POD_IP, port or 0), timeout):
                    ok = port is not None
            except OSError as exc:
                ok, self.last_error = False, f"dial tcp {POD_IP}:{port}: {exc}"
        else:
            raise ContainerConfigError(f"probe {sorted(self.spec)} not supported")
        self.failures = 0 if ok else self.failures + 1
        self.successes = self.successes + 1 if ok else 0
        return ok

    @property
    def passing(self) -> bool:
        """successThreshold consecutive successes (readiness may ask for more than one)."""
        return self.successes >= int(self.spec.get("successThreshold", 1))


@dataclass
class Container:
    """One container of a pod across its restarts."""

    spec: Mapping[str, Any]
    init: bool
    pod_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    launch: Launch | None = None
    restart_count: int = 0
    instances: int = 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "PodInitializing"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    completed: bool = False
    started: bool = False
    ready: bool = False
    restart_at: float = 0.0
    backoff: float | None = None
    started_mono: float = 0.0
    kill_deadline: float | None = None
    log_path: Path | None = None
    probes: dict[str, Probe] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, launch: Launch, at: float) -> None:
        if self.instances:
            self.restart_count += 1
        self.instances += 1
        self.launch = launch
        launch.termination_log.write_bytes(b"")  # a fresh file per container instance
        logs = self.pod_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}-{self.instances}.log"
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *launch.argv] if SETPRIV else launch.argv
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=launch.env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_mono = at
        self.state = {"running": {"startedAt": now()}}
        self.started = False
        self.ready = False
        self.kill_deadline = None
        self.probes = {
            kind: Probe(
                self.spec[kind],
                next_due=at + float(self.spec[kind].get("initialDelaySeconds", 0)) * TIME_SCALE,
            )
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if self.spec.get(kind)
        }

    def finish(self, at: float) -> None:
        """The process exited: record `terminated` and schedule the restart (kubelet back-off)."""
        assert self.proc is not None and self.launch is not None
        code = _exit_code(self.proc.returncode)
        message = ""
        with contextlib.suppress(OSError):
            message = self.launch.termination_log.read_bytes()[:MESSAGE_BYTES].decode(
                "utf-8", "replace"
            )
        fallback = self.launch.termination_policy == "FallbackToLogsOnError"
        if not message.strip() and code != 0 and fallback and self.log_path is not None:
            message = _tail(self.log_path)
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": (self.state.get("running") or {}).get("startedAt", now()),
            "finishedAt": now(),
            "containerID": f"fake://{self.proc.pid}",
        }
        if message.strip():
            terminated["message"] = message
        self.state = {"terminated": terminated}
        self.started = False
        self.ready = False
        self.proc = None
        self.kill_deadline = None
        if self.init and code == 0:
            self.completed = True
            return
        if at - self.started_mono > BACKOFF_RESET_S * TIME_SCALE:
            self.backoff = None
        if self.backoff is None:  # the first death restarts at once, as the kubelet does
            self.restart_at = at
            self.backoff = BACKOFF_INITIAL_S
        else:
            self.restart_at = at + self.backoff * TIME_SCALE
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)

    def waiting_for_backoff(self, at: float, pod_name: str) -> bool:
        """True (and state CrashLoopBackOff) while the restart back-off lasts."""
        if at >= self.restart_at:
            return False
        if "terminated" in self.state:
            self.last_state = self.state
        delay = round((self.backoff or BACKOFF_INITIAL_S) / 2)
        self.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay}s restarting failed container={self.name} "
                f"pod={pod_name}",
            }
        }
        return True

    def kill(self, grace: float, at: float) -> None:
        """Begin killing the process: SIGTERM now, SIGKILL once `grace` seconds have passed."""
        if self.proc is None or self.kill_deadline is not None:
            return
        _kill_group(self.proc, signal.SIGTERM)
        self.kill_deadline = at + grace

    def enforce_kill(self, at: float) -> None:
        if self.proc is not None and self.kill_deadline is not None and at >= self.kill_deadline:
            _kill_group(self.proc, signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready if not self.init else self.completed,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            status["containerID"] = f"fake://{self.proc.pid}"
        if not self.init:
            status["started"] = self.started
        return status


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
                _kill_group(container.proc, signal.SIGKILL)
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


class FakeKubelet:
    """Deployment controller + kubelet for the emulator at `url`; files under `root`."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.runners: dict[Key, PodRunner] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._expected: dict[str, set[str]] = {}  # deployment uid -> pod names created
        self._deleting: set[Key] = set()
        self._client = httpx.Client(base_url=url, timeout=10)
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
        deployments = self.deployments.snapshot()
        pods = self.pods.snapshot()
        uids = {d["metadata"]["uid"] for d in deployments.values()}
        for deployment in deployments.values():
            self._sync_deployment(deployment, pods)
        for key, pod in pods.items():
            owners = pod["metadata"].get("ownerReferences") or []
            orphan = any(o.get("kind") == "Deployment" for o in owners) and not any(
                o.get("uid") in uids for o in owners
            )
            if orphan:
                self._delete_pod(key)
        self._sync_runners(pods)

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
        return sorted(owned, key=lambda p: int(p["metadata"]["resourceVersion"]))

    def _sync_deployment(
        self, deployment: dict[str, Any], pods: Mapping[Key, dict[str, Any]]
    ) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        if meta.get("deletionTimestamp"):
            return
        namespace, uid = meta["namespace"], meta["uid"]
        desired = int(spec.get("replicas", 1))
        current_hash = template_hash(spec["template"])
        owned = self._owned(deployment, pods)
        seen = {p["metadata"]["name"] for p in owned}
        expected = self._expected.setdefault(uid, set())
        expected -= seen
        new = [p for p in owned if p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL) == current_hash]
        old = [p for p in owned if p not in new]
        for _ in range(desired - len(new) - len(expected)):
            expected.add(self._create_pod(deployment, current_hash))
        if len(new) > desired:
            extra = sorted(
                new, key=lambda p: (pod_ready(p), -int(p["metadata"]["resourceVersion"]))
            )
            for pod in extra[: len(new) - desired]:
                self._delete_pod((namespace, pod["metadata"]["name"]))
        if old and sum(pod_ready(p) for p in new) >= desired:
            for pod in old:
                self._delete_pod((namespace, pod["metadata"]["name"]))
        self._write_deployment_status(deployment, owned, new, desired)

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
        response = self._client.post(f"/api/v1/namespaces/{meta['namespace']}/pods", json=pod)
        response.raise_for_status()
        return name

    def _delete_pod(self, key: Key) -> None:
        if key in self._deleting:
            return
        self._deleting.add(key)
        response = self._client.delete(f"/api/v1/namespaces/{key[0]}/pods/{key[1]}")
        if response.status_code not in (200, 202, 404):
            response.raise_for_status()

    def _write_deployment_status(
        self,
        deployment: Mapping[str, Any],
        owned: list[dict[str, Any]],
        new: list[dict[str, Any]],
        desired: int,
    ) -> None:
        meta = deployment["metadata"]
        ready = sum(pod_ready(p) for p in owned)
        complete = len(new) == desired and sum(pod_ready(p) for p in new) == desired
        old_conditions = {
            c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []
        }

        def cond(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
            before = old_conditions.get(kind) or {}
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
        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(owned),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(len(owned) - ready, desired - ready, 0),
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
                    f'ReplicaSet "{meta["name"]}" has '
                    + ("successfully progressed." if complete else "is progressing."),
                ),
            ],
        }
        if not status["readyReplicas"]:
            del status["readyReplicas"]  # the API server omits zero counts
        if not status["availableReplicas"]:
            del status["availableReplicas"]
        old = dict(deployment.get("status") or {})
        if old == status:
            return
        patch = {**{k: None for k in old if k not in status}, **status}
        response = self._client.patch(
            f"/apis/apps/v1/namespaces/{meta['namespace']}/deployments/{meta['name']}/status",
            json={"status": patch},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if response.status_code != 404:
            response.raise_for_status()

    def _sync_runners(self, pods: Mapping[Key, dict[str, Any]]) -> None:
        with self._lock:
            for key, pod in pods.items():
                if key not in self.runners and not pod["metadata"].get("deletionTimestamp"):
                    self.runners[key] = PodRunner(self, pod).start()
            for key, runner in list(self.runners.items()):
                gone = key not in pods or pods[key]["metadata"].get("deletionTimestamp")
                if gone and not runner.stopping:
                    runner.stop()
            for key in [k for k in self._deleting if k not in pods]:
                self._deleting.discard(key)
