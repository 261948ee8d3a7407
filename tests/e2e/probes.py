"""Startup, readiness and liveness probes as the kubelet runs them (httpGet and tcpSocket)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from e2e.launch import POD_IP, ContainerConfigError
from e2e.timing import TIME_SCALE


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
