"""A live `modeldeploy serve` under fuzzing, load, disconnects, hostile templates and SIGTERM.

One server process serves the module (starting one costs ~5-20 s on a loaded CI box). It is
set up the way a pod runs it, with secrets to leak: the tiny model comes from a *private*
repository of a local Hub (tests/hubserver.py) fetched with HF_TOKEN, the API needs a key
(`--api-key-file`), logs are at debug level. Limits are issue 10's: `--max-concurrent 8
--max-queue 16`. A `--chat-template` file adds hostile branches (escape, loop bomb, raise)
switched on per request through `chat_template_kwargs`.

The last test SIGTERMs the server during 16 streams. Sizes are CI-sized; `make soak` runs
the same drivers (tests/soak/load.py) longer. Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hubserver import HubServer
from serve_process import ServerProcess
from soak.load import disconnect_at_random, load_round, p95, rss_bytes

API_KEY = "sk-reliability-4f1c9e"
HF_SECRET = "hf_reliabilitySecretToken9d2b"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MAX_CONCURRENT = 8
MAX_QUEUE = 16
#: Keeps every fuzzed request short (a schema-valid request may ask for the whole context).
MAX_MODEL_LEN = 96

TEMPLATE = """\
{%- if mode == 'escape' %}{{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif mode == 'globals' %}{{ cycler.__init__.__globals__.os.popen('id').read() }}
{%- elif mode == 'import' %}{% import 'os' as os %}{{ os.system('id') }}
{%- elif mode == 'loop' %}{% for i in range(10**9) %}x{% endfor %}
{%- elif mode == 'recursion' %}{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}
{%- elif mode == 'raise' %}{{ raise_exception('roles must alternate') }}
{%- endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("reliability-http")
    repo = root / "hub" / "org" / "Tiny-GGUF"
    repo.mkdir(parents=True)
    (repo / "tiny-F32.gguf").write_bytes(tiny_models.gguf("qwen2", "F32").read_bytes())
    (root / "keys").write_text(f"{API_KEY}\n")
    (root / "template.jinja").write_text(TEMPLATE)
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    with HubServer(root / "hub", tokens={"org/Tiny-GGUF": HF_SECRET}) as hub:
        proc = ServerProcess(
            "hf://org/Tiny-GGUF",
            "--served-model-name", "tiny",
            "--api-key-file", str(root / "keys"),
            "--max-concurrent", str(MAX_CONCURRENT),
            "--max-queue", str(MAX_QUEUE),
            "--chat-template", str(root / "template.jinja"),
            "--timeout", "120",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--log-level", "debug",
            "--cache-dir", str(root / "hf-cache"),
            # HOME and TMPDIR empty: what lands there would be a write outside the volumes
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": HF_SECRET, "HOME": str(home),
                 "TMPDIR": str(tmp), "XDG_CACHE_HOME": ""},
            cache_root=root / "cache",
        )  # fmt: skip
        proc.home = home  # type: ignore[attr-defined]
        try:
            proc.wait_ready(timeout=180)
            assert hub.downloads() == ["org/Tiny-GGUF/tiny-F32.gguf"], hub.requests
            yield proc
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def http(served: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=HEADERS, timeout=120) as client:
        yield client


def busy(http: httpx.Client) -> tuple[int, int]:
    """(running, waiting) as /models reports them."""
    model = http.get("/models").json()["data"][0]
    return model["running"], model["waiting"]


def engine_running(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("modeldeploy_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no modeldeploy_requests_running sample")


def wait_idle(http: httpx.Client, within: float) -> float:
    """Seconds until no slot is held and nothing waits; fail after `within`."""
    start = time.monotonic()
    while True:
        state = (*busy(http), engine_running(http))
        if state == (0, 0, 0.0):
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still busy (running, waiting, engine)={state}"
        time.sleep(0.05)


# ---- chat templates through the API ------------------------------------------------------


@pytest.mark.parametrize("mode", ["escape", "globals", "import", "loop", "recursion", "raise"])
def test_a_hostile_template_is_a_400_naming_the_template(http: httpx.Client, mode: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "chat_template_kwargs": {"mode": mode},
    }
    start = time.monotonic()
    response = http.post("/v1/chat/completions", json=body)
    elapsed = time.monotonic() - start
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "template.jinja" in error["message"], error
    assert "uid=" not in response.text and "<class" not in response.text
    assert elapsed < 5, f"{mode}: {elapsed:.1f}s"
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "key", ["tools", "add_generation_prompt", "bos_token", "eos_token", "messages", "self"]
)
def test_a_reserved_chat_template_kwarg_is_a_400_naming_it(http: httpx.Client, key: str) -> None:
    """The server sets these itself; passing one again used to be a TypeError (500)."""
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "chat_template_kwargs": {key: "x"},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert f"chat_template_kwargs key '{key}'" in response.json()["error"]["message"]
    assert http.get("/health").status_code == 200


# ---- hostile request bodies the schema fuzzer does not write ------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # past the int-digit limit
        b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # nesting past recursion
        b'{"prompt": "x", "max_tokens": 1e999}',
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "\\ud800", "max_tokens": 1}',  # a lone surrogate
        b"\xff\xfe{}",
    ],
    ids=["5000-digits", "deep-nesting", "1e999", "NaN", "surrogate", "bad-utf8"],
)
def test_pathological_json_is_a_4xx_never_a_5xx(http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_a_tiny_sampling_divisor_does_not_poison_the_model(
    tmp_path: Path, tiny_models, field: str
) -> None:
    """Own server: this bug used to poison the model for good (found by schemathesis:
    `repetition_penalty: 7.5e-175` in a schema-valid /v1/completions request): a temperature
    or repetition_penalty of 1e-300 divided the logits to inf and softmax gave NaN. Now tiny
    temperatures sample greedily and penalized logits are bounded (engine/sampling.py)."""
    proc = ServerProcess(
        tiny_models.gguf("qwen2", "F32"), "--served-model-name", "tiny",
        cache_root=tmp_path / "cache",
    )  # fmt: skip
    with proc:
        proc.wait_ready(timeout=180)
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            body = {"prompt": "x x x", "max_tokens": 3, field: 1e-300}
            response = http.post("/v1/completions", json=body)
            assert response.status_code in (200, 400), response.text
            assert http.get("/health").status_code == 200


# ---- schemathesis against our own /openapi.json -------------------------------------------


def test_schemathesis_finds_no_5xx_and_every_response_matches_the_schema(
    served: ServerProcess, http: httpx.Client
) -> None:
    from soak.fuzz import run_schemathesis

    figures = run_schemathesis(served.url, HEADERS, max_examples=3)
    print(f"\nschemathesis: {figures}")
    assert figures["failures"] == [], figures["failures"]
    paths = http.get("/openapi.json").json()["paths"]
    assert figures["operations"] == sum(len(methods) for methods in paths.values())
    assert served.proc.poll() is None
    assert http.get("/health").status_code == 200
    wait_idle(http, within=30)


# ---- load: 64 clients against 8 slots + 16 queue places ---------------------------------


def test_64_clients_get_200_or_429_none_lost_or_hung_memory_flat(
    served: ServerProcess, http: httpx.Client
) -> None:
    rounds, clients, max_tokens = 3, 64, 16
    figures = []
    for _ in range(rounds):
        fig = asyncio.run(load_round(served.url, HEADERS, clients, max_tokens, timeout=120))
        wait_idle(http, within=10)
        fig.rss_bytes = rss_bytes(served.proc.pid)
        figures.append(fig)
    for i, fig in enumerate(figures):
        assert len(fig.outcomes) == clients  # none lost
        statuses = {o.status for o in fig.outcomes}
        assert statuses <= {200, 429}, f"round {i}: {statuses}"
        assert fig.count(200) >= MAX_CONCURRENT + MAX_QUEUE, f"round {i}: too few admitted"
        for o in fig.outcomes:
            assert o.problem is None, o.problem
            if o.status == 429:
                assert o.retry_after is not None and int(o.retry_after) >= 1
    ok = [o.seconds for fig in figures for o in fig.outcomes if o.status == 200]
    growth = figures[-1].rss_bytes - figures[0].rss_bytes
    print(
        f"\nload: {rounds} rounds x {clients} clients, max_tokens {max_tokens}: "
        f"200s {[f.count(200) for f in figures]}, 429s {[f.count(429) for f in figures]}, "
        f"p50 {sorted(ok)[len(ok) // 2]:.2f}s p95 {p95(ok):.2f}s max {max(ok):.2f}s, "
        f"round wall {[round(f.wall_s, 1) for f in figures]}s, "
        f"RSS {[f.rss_bytes >> 20 for f in figures]} MiB (growth after round 1: "
        f"{growth / 2**20:+.1f} MiB)"
    )
    assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {rounds - 1} rounds"


# ---- client disconnects ---------------------------------------------------------------


def test_clients_leaving_at_random_points_free_their_slots(
    served: ServerProcess, http: httpx.Client
) -> None:
    before = busy(http)
    tokens_before = _generated(http)
    for seed in range(2):
        what = asyncio.run(disconnect_at_random(served.url, HEADERS, 24, 64, seed))
        idle_after = wait_idle(http, within=5)
        print(f"\ndisconnects (seed {seed}): all slots free {idle_after:.2f}s after the last left")
        assert len(what) == 24
    assert before == (0, 0)
    # cancelled, not run to the end: 48 streams of 64 tokens would be 3072
    assert _generated(http) - tokens_before < 48 * 64
    ok = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200


def _generated(http: httpx.Client) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("modeldeploy_generation_tokens_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- secrets ------------------------------------------------------------------------


def test_logs_never_contain_the_hf_token_or_the_api_key(
    served: ServerProcess, http: httpx.Client
) -> None:
    # also the paths where a secret would most likely leak: a wrong key, a bad request
    httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"})
    httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {HF_SECRET}"})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    time.sleep(0.3)
    assert len(served.lines) > 10
    for line in served.lines:
        assert API_KEY not in line and HF_SECRET not in line, line
        assert "hf_reliability" not in line and "sk-reliability" not in line, line


def test_the_server_writes_nothing_outside_its_volumes(
    served: ServerProcess, http: httpx.Client
) -> None:
    """The pod's root filesystem is read-only: after all the traffic above, HOME holds
    nothing (no ~/.cache of torch, triton, huggingface or anyone else)."""
    assert http.get("/health").status_code == 200
    home: Path = served.home  # type: ignore[attr-defined]
    written = sorted(p.relative_to(home) for p in home.rglob("*"))
    assert written == [], f"written under HOME: {written[:10]}"


# ---- last: SIGTERM during 16 streams ---------------------------------------------------


def test_sigterm_during_16_streams_completes_all_and_exits_0(
    served: ServerProcess, http: httpx.Client
) -> None:
    """8 generate and 8 wait for a slot when the signal comes: all 16 finish, then exit 0."""
    body = {"prompt": "Drain:", "max_tokens": 48, "ignore_eos": True, "stream": True}

    def stream(_: int) -> tuple[int, list[str]]:
        with (
            httpx.Client(base_url=served.url, headers=HEADERS, timeout=120) as own,
            own.stream("POST", "/v1/completions", json=body) as response,
        ):
            return response.status_code, list(response.iter_lines())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, i) for i in range(16)]
        deadline = time.monotonic() + 30
        while sum(busy(http)) < 16:
            assert time.monotonic() < deadline, f"only {busy(http)} in flight"
            time.sleep(0.02)
        served.signal(signal.SIGTERM)
        signalled = time.monotonic()
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(f"{served.url}/ready", timeout=5).status_code == 503
        results = [f.result(timeout=120) for f in futures]
    code = served.wait_exit(timeout=60)
    print(f"\nSIGTERM drain of 16 streams: exit {code} {time.monotonic() - signalled:.1f}s after")
    assert code == 0, served.log_tail()
    for status, lines in results:
        assert status == 200
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]", data[-3:]
        usage = [json.loads(d[6:]) for d in data[:-1]]
        assert sum(len(u["choices"][0]["text"]) > 0 for u in usage if u.get("choices")) > 0
        assert any(u["choices"][0].get("finish_reason") == "length" for u in usage if u["choices"])
