"""One container of a pod across its restarts: the process, back-off, termination message.

The kubelet's rules, kept: restart policy Always with back-off (the first restart at
once, then 10 s, 20 s, ... capped at 300 s, reset after 10 min of running; the state
says CrashLoopBackOff meanwhile), `restartCount`, `lastState`, a fresh termination
message file per instance, read after exit (4 KiB), falling back to the last 80 log
lines (2 KiB) under `FallbackToLogsOnError` when it is empty and the exit code is not 0,
and exit code 128+N for a process killed by signal N.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.launch import Launch
from e2e.probes import Probe
from e2e.timing import TIME_SCALE, now

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
#: If the test process dies without cleaning up (SIGKILL, a crash), the kernel kills the
#: containers too: util-linux `setpriv --pdeathsig KILL` execs the container's command.
SETPRIV = shutil.which("setpriv")


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


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


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
        kill_group(self.proc, signal.SIGTERM)
        self.kill_deadline = at + grace

    def enforce_kill(self, at: float) -> None:
        if self.proc is not None and self.kill_deadline is not None and at >= self.kill_deadline:
            kill_group(self.proc, signal.SIGKILL)

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
