"""Load and fault drivers against a live `modeldeploy serve`, shared by `make test` and `make soak`.

tests/test_reliability_http.py runs them CI-sized; tests/soak/ runs the same code for longer.
Each driver returns figures (latencies, RSS, counts) so the caller asserts on them and states
them; nothing here decides pass or fail except "was the answer well-formed".
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Requests of the load mix: a short chat and a short completion, each streamed or not.
CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}]}
COMPLETION = {"prompt": "Once upon a time"}


@dataclass
class Outcome:
    """What one client saw."""

    status: int
    seconds: float
    stream: bool
    retry_after: str | None = None
    problem: str | None = None  # a malformed answer (None = well-formed)


@dataclass
class RoundFigures:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_bytes: int = 0
    wall_s: float = 0.0

    def count(self, status: int) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _check_stream_lines(lines: list[str]) -> str | None:
    data = [line[6:] for line in lines if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return f"stream did not end with [DONE] (last: {data[-1:] or lines[-1:]})"
    finishes = []
    for chunk in data[:-1]:
        event = json.loads(chunk)
        if "error" in event:
            return f"error event in stream: {event['error']}"
        finishes += [c.get("finish_reason") for c in event.get("choices", [])]
    if not any(finishes):
        return "stream without a finish_reason"
    return None


def _check_body(body: dict[str, Any]) -> str | None:
    choices = body.get("choices") or []
    if len(choices) != 1 or not choices[0].get("finish_reason"):
        return f"no finished choice: {body}"
    if (body.get("usage") or {}).get("completion_tokens", 0) < 1:
        return f"no usage: {body}"
    return None


async def one_client(http: httpx.AsyncClient, stream: bool, max_tokens: int, chat: bool) -> Outcome:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {**(CHAT if chat else COMPLETION), "max_tokens": max_tokens, "stream": stream}
    body["ignore_eos"] = True
    start = time.monotonic()
    if stream:
        async with http.stream("POST", path, json=body) as response:
            lines = [line async for line in response.aiter_lines()]
            seconds = time.monotonic() - start
            if response.status_code != 200:
                return Outcome(response.status_code, seconds, True, response.headers.get(
                    "retry-after"))  # fmt: skip
            return Outcome(200, seconds, True, problem=_check_stream_lines(lines))
    response = await http.post(path, json=body)
    seconds = time.monotonic() - start
    if response.status_code != 200:
        return Outcome(response.status_code, seconds, False, response.headers.get("retry-after"))
    return Outcome(200, seconds, False, problem=_check_body(response.json()))


async def load_round(
    url: str, headers: dict[str, str], clients: int, max_tokens: int, timeout: float
) -> RoundFigures:
    """`clients` concurrent requests (half streamed, half chat), each with its own connection."""
    rng = random.Random(clients * 7919 + max_tokens)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    figures = RoundFigures()
    start = time.monotonic()
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout, limits=limits
    ) as http:
        tasks = [
            one_client(http, stream=i % 2 == 0, max_tokens=max_tokens, chat=rng.random() < 0.5)
            for i in range(clients)
        ]
        # wait_for: a hung request fails the round instead of hanging the test
        figures.outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout + 30)
    figures.wall_s = time.monotonic() - start
    return figures


async def disconnect_at_random(
    url: str, headers: dict[str, str], clients: int, max_tokens: int, seed: int
) -> list[str]:
    """Open `clients` streams at once and drop each at a random point: after a random delay
    (often while still queued for a slot, or before the first token) or after a random number
    of lines. Returns what each client did, for failure messages."""
    rng = random.Random(seed)
    done: list[str] = []

    async def consume(http: httpx.AsyncClient, after_lines: int | None) -> int:
        body = {**COMPLETION, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        seen = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for _line in response.aiter_lines():
                seen += 1
                if after_lines is not None and seen >= after_lines:
                    break
        return seen

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            if rng.random() < 0.4:
                delay = rng.uniform(0.02, 1.0)
                try:
                    seen = await asyncio.wait_for(consume(http, None), delay)
                    done.append(f"{i}: finished before its {delay:.2f}s ({seen} lines)")
                except TimeoutError:
                    done.append(f"{i}: left after {delay:.2f}s")
            else:
                after = rng.choice([1, 2, 5, 20])
                seen = await consume(http, after)
                done.append(f"{i}: left after {seen} lines")

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 120)
    return done
