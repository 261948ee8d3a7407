"""The server's lifecycle: what `/ready` and `/health` report, and why.

The port opens before the model exists, so the probes must tell the truth about a
process that is harvesting, loading, warming, serving, draining or dead. The
state is written by the loader thread and the signal handler and read by request
handlers, hence the lock; every change is a transition method, so an illegal
jump (a finished load turning a draining server back to ready) cannot happen.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any


class Phase(enum.StrEnum):
    """Where the server is; `/ready` is 200 only in READY."""

    HARVESTING = "harvesting"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


#: The order a healthy start walks through; a phase can only move forward on it.
_START_ORDER = (Phase.HARVESTING, Phase.LOADING, Phase.WARMING, Phase.READY)


@dataclass(frozen=True)
class Progress:
    """How far the current phase is: `done` of `total` `unit`s (bytes, tensors, ...)."""

    done: float
    total: float
    unit: str

    def to_dict(self) -> dict[str, Any]:
        fraction = (self.done / self.total) if self.total else None
        return {
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "fraction": None if fraction is None else round(min(fraction, 1.0), 4),
        }


class Lifecycle:
    """Thread-safe phase, progress and failure reason of one server process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = Phase.HARVESTING
        self._since = time.monotonic()
        self._progress: Progress | None = None
        self._reason: str | None = None
        self.started_at = time.monotonic()

    @property
    def phase(self) -> Phase:
        with self._lock:
            return self._phase

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    def advance(self, phase: Phase) -> bool:
        """Move forward on the start path; False (and no change) once draining or failed."""
        if phase not in _START_ORDER:
            raise ValueError(f"advance() only walks the start path, not to {phase}")
        with self._lock:
            if self._phase not in _START_ORDER:
                return False
            if _START_ORDER.index(phase) < _START_ORDER.index(self._phase):
                raise ValueError(f"cannot go back from {self._phase} to {phase}")
            if phase != self._phase:
                self._phase, self._since, self._progress = phase, time.monotonic(), None
            return True

    def set_progress(self, done: float, total: float, unit: str) -> None:
        """Record the current phase's progress (called from the loader thread)."""
        with self._lock:
            self._progress = Progress(done, total, unit)

    def fail(self, reason: str) -> None:
        """Terminal: the model cannot be served; `reason` is what Kubernetes will show."""
        with self._lock:
            if self._phase is not Phase.DRAINING:
                self._phase, self._since = Phase.FAILED, time.monotonic()
            self._reason = reason

    def drain(self) -> None:
        """Terminal: stop taking new work (SIGTERM). A failure stays a failure."""
        with self._lock:
            if self._phase is not Phase.FAILED:
                self._phase, self._since, self._progress = Phase.DRAINING, time.monotonic(), None

    def snapshot(self) -> dict[str, Any]:
        """What `/ready` reports: status, seconds in it, progress and reason when known."""
        with self._lock:
            now = time.monotonic()
            out: dict[str, Any] = {
                "status": self._phase.value,
                "phase_secs": round(now - self._since, 3),
                "uptime_secs": round(now - self.started_at, 3),
            }
            if self._progress is not None:
                out["progress"] = self._progress.to_dict()
            if self._reason is not None:
                out["reason"] = self._reason
            return out
