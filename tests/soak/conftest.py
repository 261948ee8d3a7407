"""`make soak` only: the long runs are collected when MODELDEPLOY_SOAK=1 (`make test` skips them).

They reuse the live-server fixtures of tests/test_reliability_http.py (same setup: private hub
repo, API key, --max-concurrent 8 --max-queue 16).
"""

from __future__ import annotations

import os

from test_reliability_http import http, served  # noqa: F401  (fixtures)

collect_ignore_glob = [] if os.environ.get("MODELDEPLOY_SOAK") == "1" else ["test_*.py"]
