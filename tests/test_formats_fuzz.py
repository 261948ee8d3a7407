"""Hostile input, generated: damaged headers are either read or refused with FormatError.

The hand-written corpus covers the failures we thought of; this covers the ones we did not. A
valid tiny file has random bytes overwritten or is cut short, and opening it must return a
model or raise a `FormatError` (a one-line user error) — never another exception, never hang.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats import open_model_files
from modeldeploy.server.formats.gguf_file import GGUFFile

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> tuple[bytes, int]:
    from fixtures.tiny_models import make_gguf_model

    path = make_gguf_model(tmp_path_factory.mktemp("fuzz"), "qwen3", "Q8_0")
    return path.read_bytes(), GGUFFile.open(path).data_offset


@pytest.fixture(scope="module")
def safetensors_dir(tmp_path_factory) -> Path:
    from fixtures.tiny_models import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("fuzz-st"), "llama")


def _open_or_refuse(path: Path) -> None:
    try:
        files = open_model_files(path, strict=False)
    except FormatError as exc:
        message = str(exc)
        assert "\n" not in message and message
        return
    if files.gguf is not None:  # whatever parsed must be readable within the file
        for t in files.gguf.tensors:
            assert t.offset + t.n_bytes <= files.gguf.file_size


@FUZZ
@given(data=st.data())
def test_gguf_header_mutations_are_read_or_refused(gguf_bytes, tmp_path, data):
    raw, data_offset = gguf_bytes
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(4, data_offset - 1))  # keep the magic: test the parser
        width = data.draw(st.sampled_from([1, 4, 8]))
        value = data.draw(st.binary(min_size=width, max_size=width))
        buf[pos : pos + width] = value
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    _open_or_refuse(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_gguf_truncated_anywhere_is_refused(gguf_bytes, tmp_path, cut):
    raw, _ = gguf_bytes
    path = tmp_path / "cut.gguf"
    path.write_bytes(raw[: cut % len(raw)])
    with pytest.raises(FormatError):
        open_model_files(path, strict=False)


@FUZZ
@given(data=st.data())
def test_safetensors_header_mutations_are_read_or_refused(safetensors_dir, tmp_path, data):
    raw = (safetensors_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, 8 + n - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_bytes((safetensors_dir / "config.json").read_bytes())
    (d / "model.safetensors").write_bytes(bytes(buf))
    _open_or_refuse(d / "model.safetensors")


@FUZZ
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rope_theta",
                "rope_scaling",
                "layer_types",
                "sliding_window",
                "max_window_layers",
                "use_sliding_window",
                "eos_token_id",
                "vocab_size",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 10**6),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.lists(st.integers(-1, 3), max_size=4),
            st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        ),
        max_size=5,
    ),
    model_type=st.sampled_from(["llama", "qwen2", "gemma3_text", "qwen3_moe", "mistral"]),
)
def test_config_garbage_is_refused_as_format_error(config, model_type):
    from modeldeploy.server.formats import config_from_hf

    base = {
        "model_type": model_type,
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    try:
        cfg = config_from_hf({**base, **config})
    except FormatError as exc:
        assert "\n" not in str(exc)
        return
    json.dumps(cfg.to_dict(), allow_nan=False)
