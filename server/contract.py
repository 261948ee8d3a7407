"""The fixed contract between the operator and the pod, defined once.

Ports, mount points, probe paths and environment-variable names appear both in
the manifests the operator builds and in what `modeldeploy serve` does; both
import them from here (this module must never import torch or any server-only
dependency, because the operator image does not install them).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The port `modeldeploy serve` listens on, and the container port in the pod.
SERVER_PORT = 8080
#: The Service port that fronts the server port.
SERVICE_PORT = 80
#: The name of both the container port and the Service port.
PORT_NAME = "http"
#: Host the server binds by default (the pod passes 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"

#: Where the pod mounts the shared model volume, the HF cache and the slug root.
MODELS_MOUNT = "/models"
HF_CACHE_DIR = f"{MODELS_MOUNT}/hub"
SLUG_ROOT_DIR = f"{MODELS_MOUNT}/slugs"

#: Kubernetes reads a container's termination message from this file.
TERMINATION_LOG = "/dev/termination-log"

#: Every `serve` option can also be set as MODELDEPLOY_<OPTION_NAME>.
ENV_PREFIX = "MODELDEPLOY_"
#: Overrides the root of modeldeploy's local caches (embedded models, slugs).
CACHE_ENV = "MODELDEPLOY_CACHE"


def cache_root() -> Path:
    """Root of modeldeploy's own caches: `$MODELDEPLOY_CACHE` or ~/.cache/modeldeploy."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "modeldeploy"


def default_slug_root() -> Path:
    """Where slug directories go when `--slug-root` is not given."""
    return cache_root() / "slugs"
