"""Long runs of the reliability drivers (`make soak`): more fuzz cases, more load rounds, more
disconnects. Sizes come from the environment so a soak can be stretched without editing.

MODELDEPLOY_SOAK_EXAMPLES  schemathesis cases per operation and mode (default 40)
MODELDEPLOY_SOAK_ROUNDS    load rounds of 64 clients (default 12)
MODELDEPLOY_SOAK_SEEDS     rounds of 24 random disconnects (default 10)
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from serve_process import ServerProcess
from test_reliability_http import HEADERS, MAX_CONCURRENT, MAX_QUEUE, wait_idle

from soak.fuzz import run_schemathesis
from soak.load import disconnect_at_random, load_round, p95, rss_bytes

EXAMPLES = int(os.environ.get("MODELDEPLOY_SOAK_EXAMPLES", "40"))
ROUNDS = int(os.environ.get("MODELDEPLOY_SOAK_ROUNDS", "12"))
SEEDS = int(os.environ.get("MODELDEPLOY_SOAK_SEEDS", "10"))

pytestmark = pytest.mark.timeout(3600)


def test_soak_schemathesis(served: ServerProcess, http: httpx.Client) -> None:
    figures = run_schemathesis(served.url, HEADERS, max_examples=EXAMPLES)
    print(f"\nsoak schemathesis ({EXAMPLES}/operation/mode): {figures}")
    assert figures["failures"] == []
    assert served.proc.poll() is None and http.get("/health").status_code == 200
    wait_idle(http, within=30)


def test_soak_load_rounds_keep_memory_flat(served: ServerProcess, http: httpx.Client) -> None:
    rss, p95s = [], []
    for i in range(ROUNDS):
        fig = asyncio.run(load_round(served.url, HEADERS, 64, 32, timeout=300))
        wait_idle(http, within=10)
        assert len(fig.outcomes) == 64 and {o.status for o in fig.outcomes} <= {200, 429}
        assert all(o.problem is None for o in fig.outcomes)
        assert fig.count(200) >= MAX_CONCURRENT + MAX_QUEUE, f"round {i}"
        rss.append(rss_bytes(served.proc.pid))
        p95s.append(p95([o.seconds for o in fig.outcomes if o.status == 200]))
    growth = rss[-1] - rss[1]  # round 0 warms allocator pools and caches
    print(
        f"\nsoak load: {ROUNDS} rounds x 64 clients (max_tokens 32): RSS MiB "
        f"{[r >> 20 for r in rss]}, growth after round 2 {growth / 2**20:+.1f} MiB; "
        f"p95 per round {[round(x, 2) for x in p95s]}s"
    )
    assert growth < 64 * 2**20


def test_soak_random_disconnects(served: ServerProcess, http: httpx.Client) -> None:
    for seed in range(SEEDS):
        asyncio.run(disconnect_at_random(served.url, HEADERS, 24, 64, 100 + seed))
        wait_idle(http, within=5)
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
