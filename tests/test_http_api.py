"""The HTTP API of a real `modeldeploy serve` process on a tiny model, over real HTTP.

One server process serves the whole module (starting one costs seconds): the official
`openai` client, the bad-input table, llama.cpp's tokenizer routes, /predict, model
info, metrics (parsed, and checked by `promtool`), CORS, request ids, admission (429)
and client disconnects.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from modeldeploy.server.metrics import METRIC_NAMES
from prometheus_client.parser import text_string_to_metric_families
from prometheus_harness import promtool_check_metrics
from serve_process import ServerProcess

API_KEY = "test-key-123"
MAX_PROMPT_TOKENS = 200
MAX_BODY_BYTES = 64 * 1024
MAX_CONCURRENT = 2
MAX_QUEUE = 2
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("http-api")
    keys = root / "keys"
    keys.write_text(f"{API_KEY}\n")
    proc = ServerProcess(
        tiny_models.gguf("qwen2", "F32"),
        "--served-model-name", "tiny",
        "--api-key-file", str(keys),
        "--max-concurrent", str(MAX_CONCURRENT),
        "--max-queue", str(MAX_QUEUE),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--max-body-bytes", str(MAX_BODY_BYTES),
        "--timeout", "120",
        cache_root=root / "cache",
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    samples = metric_samples(http.get("/metrics").text)
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


# ---- the official OpenAI client ---------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_stream_equals_non_stream_and_usage_counts_tokens(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    kwargs = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    reply = client.chat.completions.create(**kwargs, logprobs=True)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    # usage is real: prompt tokens are the rendered template's tokens, completion tokens
    # are one logprob entry per generated token
    prompt = http.post("/apply-template", json={"messages": MESSAGES}).json()["prompt"]
    ids = http.post("/tokenize", json={"content": prompt, "add_special": False}).json()["tokens"]
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(choice.logprobs.content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_and_length_finish(client: openai.OpenAI, http: httpx.Client) -> None:
    reply = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    ids = http.post("/tokenize", json={"content": "Once upon a time", "add_special": True})
    assert reply.usage.prompt_tokens == len(ids.json()["tokens"])
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_completions_logprobs_and_token_prompt(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"content": "hello world"}).json()["tokens"]
    body = {"prompt": ids, "max_tokens": 3, "logprobs": 2, "temperature": 0, "ignore_eos": True}
    reply = http.post("/v1/completions", json=body).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == reply["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == len(ids)


def test_stop_sequence_ends_with_stop(http: httpx.Client) -> None:
    body = {"prompt": "abc", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    free = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    starts = [
        i
        for i in range(2, len(free) - 1)
        if free[i : i + 2].isascii() and free[i : i + 2].isalnum()
    ]
    if not starts:
        pytest.skip(f"tiny model text has no usable stop string: {free!r}")
    stop = free[starts[0] : starts[0] + 2]
    reply = http.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["text"] == free[: free.index(stop)]


# ---- bad input: documented status, OpenAI error shape, field named ----------------

BIG_PROMPT = "word " * 400  # far over --max-prompt-tokens 200

BAD_INPUT = [
    # (name, path, raw body or json, status, text the message must contain, param)
    ("malformed json", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    ("messages not a list", "/v1/chat/completions",
     {"messages": "hi"}, 400, "messages", "messages"),
    ("temperature wrong type", "/v1/chat/completions",
     {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("negative max_tokens", "/v1/chat/completions",
     {"messages": MESSAGES, "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions",
     {"messages": MESSAGES, "max_tokens": 10**9}, 400, "1000000000 exceeds", "max_tokens"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("unknown role", "/v1/chat/completions",
     {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].type: Input should be 'text'", None),
    ("n above 1", "/v1/chat/completions", {"messages": MESSAGES, "n": 3}, 400, "n:", "n"),
    ("unknown model", "/v1/chat/completions",
     {"model": "gpt-9", "messages": MESSAGES}, 404, "'gpt-9' does not exist", "model"),
    ("prompt over the limit", "/v1/completions", {"prompt": BIG_PROMPT, "max_tokens": 1},
     400, f"but the --max-prompt-tokens limit is {MAX_PROMPT_TOKENS} tokens", None),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 10**7]}, 400, "prompt[1]", None),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("body over the cap", "/v1/completions",
     {"prompt": "x" * (MAX_BODY_BYTES + 10)}, 413, f"limit of {MAX_BODY_BYTES} bytes", None),
    ("predict without input", "/predict", {"inputs": ["x"]}, 400, "input", "input"),
    ("detokenize bad id", "/detokenize", {"tokens": [-1]}, 400, "tokens[0]", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "needle", "param"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_table(
    http: httpx.Client,
    path: str,
    body: bytes | dict,
    status: int,
    needle: str,
    param: str | None,
) -> None:
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    assert "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param
    assert response.headers["content-type"].startswith("application/json")


def test_chunked_body_over_the_cap_is_413(http: httpx.Client) -> None:
    """No Content-Length (chunked upload): the cap is enforced while reading."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    response = http.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_api_key_required_except_probes(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        missing = anonymous.get("/v1/models")
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_unknown_route_and_method_in_openai_shape(http: httpx.Client) -> None:
    missing = http.get("/v2/nothing")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong_method = http.get("/v1/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_curl_style_form_content_type_is_read_as_json(http: httpx.Client) -> None:
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    response = http.post(
        "/v1/completions",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text


# ---- llama.cpp routes, /predict, model info ----------------------------------------


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello, wörld!"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens


def test_predict_and_batch(http: httpx.Client) -> None:
    one = http.post("/predict", json={"input": "The sky is", "max_tokens": 4}).json()
    assert set(one) == {"output", "latency_ms", "tokens"}
    assert 1 <= one["tokens"] <= 4 and one["latency_ms"] > 0
    batch = http.post(
        "/predict/batch", json={"inputs": ["The sky is", "Water is"], "max_tokens": 4}
    ).json()
    assert len(batch["output"]) == 2
    assert batch["output"][0] == one["output"]  # temperature 0 by default: repeatable
    too_many = http.post("/predict/batch", json={"inputs": ["x"] * 50})
    assert too_many.status_code == 400 and "capacity" in too_many.json()["error"]["message"]


def test_model_tensors_models(http: httpx.Client) -> None:
    info = http.get("/model").json()
    assert info["format"] == "gguf" and info["architecture"] == "qwen2"
    assert {"dtype", "device", "memory", "max_model_len"} <= set(info)
    tensors = http.get("/tensors").json()
    assert tensors["count"] == len(tensors["tensors"]) > 0
    assert {"name", "dtype", "shape"} <= set(tensors["tensors"][0])
    models = http.get("/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["status"] == "loaded"
    assert models[0]["devices"] == [info["device"]]


def test_health_ready_shapes(http: httpx.Client) -> None:
    health = http.get("/health").json()
    assert health["status"] == "healthy" and health["model"] == "tiny"
    assert health["uptime_secs"] > 0
    assert http.get("/ready").json()["status"] == "ready"


def test_openapi_lists_every_route_and_no_422(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/health", "/ready", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
        "/model", "/tensors", "/models", "/predict", "/predict/batch", "/tokenize", "/detokenize",
    } <= paths  # fmt: skip
    text = json.dumps(schema)
    assert '"422"' not in text
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "503", "504"} <= set(chat)


# ---- headers, logs ------------------------------------------------------------------


def test_cors_and_request_id(server: ServerProcess, http: httpx.Client) -> None:
    preflight = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "https://app.example")
    response = http.get(
        "/v1/models", headers={"X-Request-Id": "req-abc-123", "Origin": "https://app.example"}
    )
    assert response.headers["x-request-id"] == "req-abc-123"
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    generated = http.get("/v1/models").headers["x-request-id"]
    assert len(generated) >= 16
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        logged = [r for r in server.records() if r.get("request_id") == "req-abc-123"]
        if logged:
            break
        time.sleep(0.1)
    assert logged and logged[0]["path"] == "/v1/models" and logged[0]["status"] == 200
    assert logged[0]["model"] == "tiny"


def test_logs_are_json_and_never_contain_the_api_key(server: ServerProcess) -> None:
    assert server.lines
    for line in server.lines:
        assert API_KEY not in line
    assert all(line.startswith("{") for line in server.lines if line.strip()), server.log_tail()


# ---- metrics --------------------------------------------------------------------------


def test_metrics_parse_and_name_every_documented_metric(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 3})
    too_big = {"prompt": "x" * (MAX_BODY_BYTES + 1)}
    assert http.post("/v1/completions", json=too_big).status_code == 413
    text = http.get("/metrics").text
    names = {s[0] for s in metric_samples(text)}
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        base = name.removesuffix("_total")
        assert base in families or name in names, name
    assert not any(n.endswith("_created") for n in names)
    assert metric(http, "modeldeploy_model_info", model="tiny", format="gguf") == 1
    assert metric(http, "modeldeploy_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(http, "modeldeploy_requests_total", endpoint="/v1/completions", status="413") >= 1
    assert metric(http, "modeldeploy_generation_tokens_total", model="tiny") >= 3
    assert metric(http, "modeldeploy_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(http, "modeldeploy_model_load_seconds", model="tiny") > 0


def test_promtool_check_metrics(http: httpx.Client) -> None:
    if shutil.which("promtool") is None and os.environ.get("CI", "").lower() != "true":
        pytest.skip("promtool not installed (apt-get install prometheus); .ci/run installs it")
    result = promtool_check_metrics(http.get("/metrics").text)  # fails loudly in CI if absent
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


# ---- admission and disconnects ---------------------------------------------------------


def test_queue_full_is_429_with_retry_after_and_the_rest_succeed(
    server: ServerProcess, http: httpx.Client
) -> None:
    """Fill the slots with long streams and the queue with short requests: the next get 429."""
    long_body = {"prompt": "Long:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    short_body = {"prompt": "Short:", "max_tokens": 5, "ignore_eos": True}
    readers = []  # keep the line iterators: dropping one closes its stream
    # exit order matters: the streams close first, then the pool waits for the queued ones
    with concurrent.futures.ThreadPoolExecutor(4) as pool, contextlib.ExitStack() as streams:
        for _ in range(MAX_CONCURRENT):
            response = streams.enter_context(http.stream("POST", "/v1/completions", json=long_body))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            next(readers[-1])  # generating
        queued = [
            pool.submit(http.post, "/v1/completions", json=short_body) for _ in range(MAX_QUEUE)
        ]
        deadline = time.monotonic() + 10
        while http.get("/models").json()["data"][0]["waiting"] < MAX_QUEUE:
            assert time.monotonic() < deadline, "queued requests never showed as waiting"
            time.sleep(0.02)
        for _ in range(3):
            refused = http.post("/v1/completions", json=short_body)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert metric(http, "modeldeploy_requests_waiting", model="tiny") == MAX_QUEUE
    # the streams are closed now; the queued requests get their turn and succeed
    for future in queued:
        answered = future.result(timeout=120)
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] == 5


def test_disconnect_mid_stream_frees_the_slot(server: ServerProcess, http: httpx.Client) -> None:
    max_tokens = 400
    before = metric(http, "modeldeploy_generation_tokens_total", model="tiny")
    body = {
        "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with (
        httpx.Client(base_url=server.url, headers=http.headers, timeout=60) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert http.get("/models").json()["data"][0]["running"] == 1
        assert metric(http, "modeldeploy_requests_running", model="tiny") == 1  # the engine's
    # leaving the block closed the connection mid-stream
    gone_at = time.monotonic()
    while time.monotonic() - gone_at < 1.0:
        running = metric(http, "modeldeploy_requests_running", model="tiny")
        admitted = http.get("/models").json()["data"][0]["running"]
        if running == 0 and admitted == 0:
            break
        time.sleep(0.05)
    assert running == 0 and admitted == 0, "slot still busy a second after the disconnect"
    generated = metric(http, "modeldeploy_generation_tokens_total", model="tiny") - before
    assert generated < max_tokens  # cancelled, not run to the end
    ok = http.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2})
    assert ok.status_code == 200


def test_disconnect_while_waiting_for_a_non_stream_answer_frees_the_slot(
    server: ServerProcess, http: httpx.Client
) -> None:
    body = {"prompt": "Long:", "max_tokens": 480, "ignore_eos": True}
    with (
        httpx.Client(base_url=server.url, headers=http.headers, timeout=0.25) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/completions", json=body)  # gives up and closes the connection
    gone_at = time.monotonic()
    while metric(http, "modeldeploy_requests_running", model="tiny") != 0:
        assert time.monotonic() - gone_at < 1.0, "generation still running after the client left"
        time.sleep(0.05)
    assert http.get("/models").json()["data"][0]["running"] == 0
    closed = metric(http, "modeldeploy_requests_total", endpoint="/v1/completions", status="499")
    assert closed >= 1  # counted as 'client closed', not as a success or a 5xx


# ---- last: this test ends the module's server ------------------------------------------


def test_second_signal_stops_at_once(server: ServerProcess) -> None:
    """SIGTERM starts a drain; a second SIGTERM stops now, cutting streams (exit 128+15)."""
    body = {"prompt": "Long:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        server.signal(signal.SIGTERM)
        time.sleep(0.1)
        server.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert server.wait_exit(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - stopped < 5
        rest = []
        with contextlib.suppress(httpx.HTTPError):
            rest = list(lines)
    assert "data: [DONE]" not in rest  # the stream was cut, not finished
