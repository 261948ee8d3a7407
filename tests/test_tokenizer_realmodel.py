# ruff: noqa: RUF001 (the corpus is deliberately full of look-alike characters)
"""Real GGUF vocabularies (Qwen2.5 152k byte-level BPE, Gemma 3 262k SentencePiece) against
transformers' tokenizer for the same file, plus the build and encode times we promise.

Run with `-s` to see the figures (build seconds, per-request encode milliseconds).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from modeldeploy.server.engine.gguf_tokenizer import tokenizer_from_gguf
from modeldeploy.server.engine.tokenizer import Tokenizer
from modeldeploy.server.formats.gguf_file import GGUFFile

CORPUS = [
    "Hello, world! How are you today?",
    " leading space and trailing space ",
    "  two leading spaces\tand a tab\n\nand blank lines\r\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // C',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "Numbers 1234567890 3.14159 -42 1e-9 0xFF 1,000,000",
    "Français: œuvre, naïve, déjà vu. Deutsch: Größe, Straße.",
    "Русский текст с пунктуацией — и кавычками «ёлки».",
    "中文：你好，世界！这是一个测试。日本語：こんにちは、世界。カタカナ。",
    "한국어 문장입니다. Tiếng Việt có dấu. ภาษาไทย. العربية. עברית. हिन्दी",
    "Emoji: 🙂😀🚀🔥 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ✓ ✗ ★ ♥︎ 🧑🏽‍💻",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑_{i=1}^{n} i = n(n+1)/2; √2 ≈ 1.414",
    "it's we're they've I'm you'll he'd DON'T WON'T",
    "URL https://example.com/path?q=a+b&x=1#frag and e-mail a.b@c.org",
    "    indented\n\t\ttabs\n        more   spaces   inside",
    "<|im_start|>user\nHi<|im_end|>\n<start_of_turn>model\n",
    "zero-width\u200bspace, nbsp\u00a0here, soft\u00adhyphen",
]


@pytest.fixture(scope="module")
def real_models(qwen_gguf: Path, gemma_gguf: Path) -> dict[str, Path]:
    return {"qwen": qwen_gguf, "gemma": gemma_gguf}


_OURS: dict[Path, tuple[Tokenizer, float, float]] = {}


def _ours(path: Path) -> tuple[Tokenizer, float, float]:
    """(tokenizer, seconds reading metadata, seconds building), cached per session."""
    if path not in _OURS:
        start = time.perf_counter()
        with GGUFFile.open(path) as gguf:
            meta = dict(gguf.metadata)
        read = time.perf_counter() - start
        start = time.perf_counter()
        tok = Tokenizer.from_files(None, meta)
        _OURS[path] = (tok, read, time.perf_counter() - start)
    return _OURS[path]


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_ids_match_transformers_for_a_multilingual_code_emoji_corpus(
    real_models, hf_gguf_tokenizer, name
):
    path = real_models[name]
    ours, _, _ = _ours(path)
    theirs, _ = hf_gguf_tokenizer(path)
    for text in CORPUS:
        for special in (True, False):
            expected = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
        ids = theirs.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
        # both vocabularies are lossless on text without special tokens
        if "<" not in text:
            assert ours.decode(ids) == text
    assert ours.bos_token == theirs.bos_token
    assert ours.eos_token == theirs.eos_token
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_streaming_decode_of_real_vocabularies_is_whole_characters(real_models, name):
    ours, _, _ = _ours(real_models[name])
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=False)
        decoder = ours.incremental_decoder()
        deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(deltas) == ours.decode(ids)
        assert not any("\ufffd" in d for d in deltas), text
        if "<" not in text:  # logprobs' per-token bytes add up to the text's UTF-8
            assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_end_of_generation_ids(real_models):
    qwen, _, _ = _ours(real_models["qwen"])
    gemma, _, _ = _ours(real_models["gemma"])
    assert {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")} <= qwen.eos_token_ids
    assert {gemma.token_to_id("<eos>"), gemma.token_to_id("<end_of_turn>")} <= gemma.eos_token_ids
    assert gemma.encode("hi")[0] == gemma.bos_token_id  # Gemma adds <bos>, Qwen does not
    assert qwen.encode("hi")[0] != qwen.bos_token_id


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_build_is_far_faster_than_transformers_and_encode_is_cheap(
    real_models, hf_gguf_tokenizer, name
):
    path = real_models[name]
    _, theirs_seconds = hf_gguf_tokenizer(path)
    with GGUFFile.open(path) as gguf:
        meta = dict(gguf.metadata)
    builds = []
    for _ in range(2):
        start = time.perf_counter()
        tokenizer_from_gguf(meta)
        builds.append(time.perf_counter() - start)
    ours, read, _ = _ours(path)
    build = min(builds)

    prompt = "\n".join(CORPUS) * 8  # ~2-3k tokens, a long chat prompt
    n_tokens = len(ours.encode(prompt))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        ours.encode(prompt)
        times.append(time.perf_counter() - start)
    encode_ms = statistics.median(times) * 1000
    short = []
    for _ in range(50):
        start = time.perf_counter()
        ours.encode(CORPUS[0])
        short.append(time.perf_counter() - start)
    short_ms = statistics.median(short) * 1000
    print(
        f"\n{name}: metadata read {read:.2f} s, tokenizer build {build:.2f} s "
        f"(transformers {theirs_seconds:.1f} s, {theirs_seconds / build:.0f}x); encode "
        f"{n_tokens} tokens {encode_ms:.2f} ms median, short prompt {short_ms:.3f} ms"
    )
    assert build * 3 < theirs_seconds
    assert encode_ms < 250
