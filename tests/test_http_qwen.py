"""The official OpenAI client against `modeldeploy serve` on the real Qwen2.5-Coder GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_process import ServerProcess

QUESTION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2? Answer with the number only."},
]


@pytest.fixture(scope="module")
def qwen_server(
    qwen_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("qwen")
    proc = ServerProcess(
        qwen_gguf, "--max-model-len", "1024", "--max-concurrent", "2", cache_root=root / "cache"
    )
    try:
        proc.wait_ready(timeout=300)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(qwen_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key="unused", max_retries=0)


def test_models_names_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["qwen2.5-coder-0.5b-instruct"]


def test_chat_answers_and_stream_matches_with_true_usage(
    client: openai.OpenAI, qwen_server: ServerProcess
) -> None:
    model = client.models.list().data[0].id
    kwargs = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    reply = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    text = reply.choices[0].message.content
    assert "4" in text
    assert reply.choices[0].finish_reason == "stop"  # <|im_end|> ended it, not max_tokens
    assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.content)
    with httpx.Client(base_url=qwen_server.url, timeout=60) as http:
        prompt = http.post("/apply-template", json={"messages": QUESTION}).json()["prompt"]
        assert prompt.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>")
        ids = http.post("/tokenize", json={"content": prompt}).json()["tokens"]
    assert reply.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage == reply.usage


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    kwargs = {"model": model, "prompt": "def fibonacci(n):", "temperature": 0, "max_tokens": 6}
    reply = client.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == reply.choices[0].text
    assert reply.choices[0].text.strip()
