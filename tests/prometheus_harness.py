"""A real Prometheus (Debian's `prometheus` package) on 127.0.0.1 for the dashboard tests.

`.ci/run` installs the package when it is missing. `Prometheus.start()` writes a
temporary config that scrapes the given targets every second, with the `namespace`
and `pod` labels that a PodMonitor's Kubernetes service discovery would attach, so
the dashboards' variables have something to select. `promtool()` runs
`promtool check metrics` on an exposition.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary(name: str) -> str:
    """Path of `prometheus` or `promtool`; a clear failure (never a skip) when absent."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} not found: install Debian's prometheus package (.ci/run does it: "
            "apt-get install -y prometheus)"
        )
    return path


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` reads an exposition on stdin; lint problems go to stdout."""
    return subprocess.run(
        [binary("promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Target:
    """One scrape job: where /metrics is and the labels service discovery would add."""

    job: str
    address: str  # host:port
    labels: dict[str, str]


class Prometheus:
    """A Prometheus server process with a throw-away config and TSDB."""

    def __init__(self, workdir: Path, targets: list[Target]) -> None:
        self.workdir = workdir
        self.targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [
                {
                    "job_name": t.job,
                    "static_configs": [{"targets": [t.address], "labels": t.labels}],
                }
                for t in self.targets
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        check = subprocess.run(
            [binary("promtool"), "check", "config", str(config_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.read_log()}")
            try:
                if http_get(f"{self.url}/-/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout} s: {self.read_log()}")

    def read_log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def api(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        """GET /api/v1/<path>; returns the decoded reply (status, data, error...)."""
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}")
        reply = json.loads(body)
        reply["http_status"] = status
        return reply

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll an instant query until it returns at least one series."""
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] = {}
        while time.monotonic() < deadline:
            reply = self.query(expr)
            if reply.get("status") == "success" and reply["data"]["result"]:
                return reply["data"]["result"]
            time.sleep(0.5)
        raise AssertionError(f"no data for {expr!r} in {timeout} s: {reply}\n{self.read_log()}")
