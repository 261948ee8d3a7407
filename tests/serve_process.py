"""Run `modeldeploy serve` as a real subprocess for tests: port, logs, readiness, signals.

The server is started with `--port 0`; its JSON `listening` log line says which port
the OS picked, so parallel test runs never race for a port. stderr is read by a
thread into `lines` so tests can assert on logs and the pipe never fills up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELDEPLOY = [sys.executable, "-m", "modeldeploy.server.cli", "serve"]


class ServerProcess:
    """One `modeldeploy serve` child process."""

    def __init__(
        self,
        source: str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        cache_root: Path | None = None,
    ) -> None:
        child_env = dict(os.environ)
        child_env.pop("MODELDEPLOY_TERMINATION_LOG", None)
        if cache_root is not None:
            child_env["MODELDEPLOY_CACHE"] = str(cache_root)
        child_env.update(env or {})
        self.command = [*MODELDEPLOY, str(source), "--port", "0", *args]
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env,
            cwd=REPO_ROOT,
            text=True,
        )
        self.lines: list[str] = []
        self._port_known = threading.Event()
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            record = _json(line)
            if record and record.get("msg") == "listening":
                self.port = int(record["port"])
                self._port_known.set()
        self._port_known.set()  # process ended: stop waiting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far."""
        return [r for r in (_json(line) for line in list(self.lines)) if r is not None]

    def wait_listening(self, timeout: float = 60) -> None:
        if not self._port_known.wait(timeout) or self.port is None:
            raise RuntimeError(f"server did not start listening:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        """Poll /ready until 200; fail with the log tail if the server fails or exits."""
        self.wait_listening()
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/ready", timeout=5)
                last = response.json()
                if response.status_code == 200:
                    return last
                if last.get("status") == "failed":
                    raise RuntimeError(f"load failed: {last}\n{self.log_tail()}")
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"not ready after {timeout}s (last: {last}):\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> None:
        """Terminate (drain) and, if it lingers, kill. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _json(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
