"""The fake node's clock: how much faster than declared its periods run, and its timestamps."""

from __future__ import annotations

import datetime
import os

#: Every *period* (probe periods, restart back-off) is multiplied by this; thresholds,
#: timeouts and grace periods are not. Env MODELDEPLOY_E2E_TIME_SCALE overrides it.
TIME_SCALE = float(os.environ.get("MODELDEPLOY_E2E_TIME_SCALE", "0.2"))
#: How often a pod's sync loop looks at its containers (seconds).
TICK_S = 0.05


def now() -> str:
    """An RFC 3339 timestamp, as the API server writes them."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
