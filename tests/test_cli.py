"""The console script: dispatch, usage errors and exit codes."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unknown_command_is_bad_input() -> None:
    proc = _run("frobnicate")
    assert proc.returncode == 2
    assert "frobnicate" in proc.stderr


def test_bad_option_is_one_line_exit_2() -> None:
    proc = _run("inspect", "--no-such-flag", "/x")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
