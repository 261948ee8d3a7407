"""`kubectl` itself refuses invalid ModelDeployments and documents the fields.

kubectl v1.35 (from the PyPI wheel, see tests/tools.py) talks to the strict
emulator, which serves the CRD's schema as OpenAPI v3: `kubectl apply` then lets
the server validate (fieldValidation=Strict), and `kubectl explain` reads the
CRD's descriptions.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube.cluster import MD, Cluster
from tools import kubectl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator:
    binary = str(kubectl())
    home = tmp_path_factory.mktemp("kubectl")
    with Cluster() as cluster:
        env = {
            **os.environ,
            "HOME": str(home),
            "KUBECONFIG": str(cluster.kubeconfig(home / "kubeconfig", "kubectl")),
        }

        def kubectl_run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run(
                [binary, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
            )

        kubectl_run.cluster = cluster  # type: ignore[attr-defined]
        yield kubectl_run


def test_examples_apply_and_show_printer_columns(run) -> None:
    applied = run("apply", *[arg for p in EXAMPLES for arg in ("-f", str(p))])
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("created") == len(EXAMPLES)
    listed = run("get", "md")
    assert listed.returncode == 0, listed.stderr
    header = listed.stdout.splitlines()[0].split()
    assert header == ["NAME", "SOURCE", "REPLICAS", "READY", "PHASE", "AGE"]
    assert "hf://Qwen/Qwen2.5-0.5B-Instruct" in listed.stdout
    stored = run.cluster.get(MD, "kubectl", "qwen-cpu")
    assert stored["spec"]["startupTimeoutSeconds"] == 1800, "the CRD's defaults apply"


@pytest.mark.parametrize(
    ("replace", "by", "field"),
    [
        ("replicas: 1", "replica: 1", "spec.replica"),
        ("replicas: 1", "replicas: -2", "spec.replicas"),
        ("source: file:///models/local/tiny", "source: ftp://host/model", "spec.model.source"),
        ("    drainTimeoutSeconds: 5", "    port: 80", "spec.server.port"),
        (
            "    claim:\n      name: tiny-models",
            "    claim:\n      name: tiny-models\n    emptyDir: {}",
            "spec.storage",
        ),
        ("servedName: tiny", "servedName: tiny\n    revision: main", "spec.model.revision"),
    ],
    ids=["typo", "negative-replicas", "scheme", "port", "two-storage-kinds", "revision-on-file"],
)
def test_kubectl_apply_refuses_naming_the_field(run, replace: str, by: str, field: str) -> None:
    manifest = (ROOT / "examples" / "tiny-local.yaml").read_text()
    assert replace in manifest
    bad = manifest.replace(replace, by).replace("name: tiny-local", "name: refused")
    result = run("apply", "-f", "-", stdin=bad)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr
    assert run.cluster.get_or_none(MD, "kubectl", "refused") is None


def test_kubectl_explain_documents_the_fields(run) -> None:
    explained = run("explain", "md.spec.model")
    assert explained.returncode == 0, explained.stderr
    for field in ("source", "revision", "quant", "servedName"):
        assert field in explained.stdout
    assert "hf://ORG/REPO" in explained.stdout
