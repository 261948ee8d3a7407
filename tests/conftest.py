"""Shared pytest configuration. Fixtures that build models live in tests/fixtures/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

# Tests must never reach a real hub, and must not share caches with the user.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Servers the tests start decode eagerly: compiling after ready (`--compile`, on by
# default) would cost each of them seconds of CPU while its tests run, and switch decode
# numerics mid-module. test_engine_compiled turns it on where it is the subject.
os.environ.setdefault("MODELDEPLOY_COMPILE", "0")

# Tiny-model fixtures (tiny_models, tiny_hf_model, tiny_gguf_model): tests/fixtures/plugin.py
pytest_plugins = ["fixtures.plugin"]


# Embedded real models (PyPI chunk packages, assembled and sha256-verified once into
# modeldeploy's cache; later sessions reuse the file). Tests that use them are marked
# `realmodel` automatically, so `-m "not realmodel"` skips them.
_REAL_MODEL_FIXTURES = {"qwen_gguf", "gemma_gguf"}


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """qwen2.5-coder-0.5b-instruct, GGUF (qwen2, chat template inside)."""
    from modeldeploy.server.catalogue import ensure_model

    return ensure_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """gemma-3-270m, GGUF Q4_K_M (gemma3)."""
    from modeldeploy.server.catalogue import ensure_model

    return ensure_model("gemma-3-270m")


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    """transformers' tokenizer for a GGUF file (the oracle), built once per file per session.

    Returns `get(path) -> (tokenizer, seconds_to_build)`; building takes ~10 s per real model.
    """
    import time

    cache: dict[Path, tuple[object, float]] = {}

    def get(path: Path):
        if path not in cache:
            from transformers import AutoTokenizer

            start = time.perf_counter()
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            cache[path] = (tok, time.perf_counter() - start)
        return cache[path]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realmodel)
