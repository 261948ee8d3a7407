"""Shared pytest configuration. Fixtures that build models live in tests/fixtures/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

# Tests must never reach a real hub, and must not share caches with the user.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
