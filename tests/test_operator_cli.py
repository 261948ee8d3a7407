"""`modeldeploy operator` as a process: flags, kubeconfig login, liveness, metrics, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import kmock
import pytest
from kube.cluster import MD, Cluster, wait_for
from modeldeploy.operator import metrics
from modeldeploy.server.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["operator"], "give --namespace NS (repeatable) or --all-namespaces"),
        (["operator", "-n", "a", "--all-namespaces"], "either --namespace NS"),
        (["operator", "-A", "--reconcile-interval", "0"], "--reconcile-interval must be positive"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_operator_modules_do_not_import_torch() -> None:
    """The operator image does not install torch (DESIGN.md)."""
    code = (
        "import sys, modeldeploy.operator.main, modeldeploy.operator.handlers; "
        "sys.exit('torch' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_operator_process_against_the_emulator(tmp_path: Path) -> None:
    health, metrics_port = _free_port(), _free_port()
    with Cluster() as cluster:
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig(tmp_path / "kubeconfig", "cli")),
            "MODELDEPLOY_SERVER_IMAGE": "registry.test/from-env:7",
        }
        command = [
            sys.executable,
            "-m",
            "modeldeploy.server.cli",
            "operator",
            "--namespace",
            "cli",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics_port),
        ]
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            cluster.create(
                MD,
                {
                    "apiVersion": "modeldeploy.dev/v1alpha1",
                    "kind": "ModelDeployment",
                    "metadata": {"name": "viaproc", "namespace": "cli"},
                    "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
                },
            )
            deployment = wait_for(
                lambda: cluster.get_or_none(DEPLOYMENTS, "cli", "viaproc"), timeout=30
            )
            image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image == "registry.test/from-env:7"
            probe = wait_for(lambda: _get(f"http://127.0.0.1:{health}/healthz"), timeout=15)
            assert probe.status_code == 200
            scraped = wait_for(
                lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), timeout=15
            ).text
            for name in metrics.METRIC_NAMES:
                assert name in scraped, name
            assert 'modeldeploy_operator_modeldeployments{phase="Pending"} 1.0' in scraped
        finally:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=30)[0].decode(errors="replace")
            stopped_in = time.monotonic() - started
        assert proc.returncode == 0, output[-3000:]
        assert stopped_in < 10, f"SIGTERM took {stopped_in:.1f}s"


def _get(url: str) -> httpx.Response | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response if response.status_code == 200 else None
