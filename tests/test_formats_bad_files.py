"""The bad-file corpus: every broken or hostile file is refused fast, cheaply and clearly.

Each case is built by the test, then handed to `modeldeploy inspect` (through the console
script's `main`, exactly as a user runs it): exit code 2, exactly one line on stderr naming the
file and the reason, within 1 s and without a large allocation (tracemalloc peak).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.tiny_models import copy_model
from modeldeploy.server.cli import main

EXABYTES_8 = 8 * 10**18


def _gguf_header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def st_huge_header(tmp: Path, models) -> Path:
    p = tmp / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", EXABYTES_8) + b'{"a": 1}')
    return p


def st_header_not_json(tmp: Path, models) -> Path:
    p = tmp / "notjson.safetensors"
    body = b"{this is not json at all"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    return p


def st_offsets_past_end(tmp: Path, models) -> Path:
    p = tmp / "offsets.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return p


def st_truncated(tmp: Path, models) -> Path:
    src = models.hf("llama") / "model.safetensors"
    p = tmp / "truncated.safetensors"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return p


def index_missing_shard(tmp: Path, models) -> Path:
    d = copy_model(models.hf("qwen2", sharded=True), tmp / "missing-shard")
    (d / "model-00002-of-00002.safetensors").unlink()
    return d / "model.safetensors.index.json"


def index_tensor_not_in_shard(tmp: Path, models) -> Path:
    d = copy_model(models.hf("qwen2", sharded=True), tmp / "wrong-shard")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    return index_path


def index_shard_outside_dir(tmp: Path, models) -> Path:
    d = copy_model(models.hf("qwen2", sharded=True), tmp / "escape")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    return index_path


def gguf_bad_version(tmp: Path, models) -> Path:
    p = tmp / "badversion.gguf"
    p.write_bytes(_gguf_header(version=99) + b"\0" * 64)
    return p


def gguf_version_1(tmp: Path, models) -> Path:
    p = tmp / "v1.gguf"
    p.write_bytes(_gguf_header(version=1) + b"\0" * 64)
    return p


def gguf_absurd_tensor_count(tmp: Path, models) -> Path:
    p = tmp / "tensors.gguf"
    p.write_bytes(_gguf_header(n_tensors=2**62) + b"\0" * 64)
    return p


def gguf_string_past_eof(tmp: Path, models) -> Path:
    p = tmp / "string.gguf"
    p.write_bytes(_gguf_header(n_kv=1) + struct.pack("<Q", 2**40) + b"general.arch")
    return p


def gguf_array_past_eof(tmp: Path, models) -> Path:
    p = tmp / "array.gguf"
    kv = _gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**50)
    p.write_bytes(_gguf_header(n_kv=1) + kv + b"\0" * 32)
    return p


def gguf_truncated_tensor_data(tmp: Path, models) -> Path:
    src = models.gguf("llama", "F32")
    p = tmp / "truncated.gguf"
    p.write_bytes(src.read_bytes()[: int(src.stat().st_size * 0.6)])
    return p


def gguf_unknown_tensor_type(tmp: Path, models) -> Path:
    p = tmp / "ttype.gguf"
    info = _gguf_string(b"w") + struct.pack("<IQIQ", 1, 32, 4242, 0)
    p.write_bytes(_gguf_header(n_tensors=1) + info + b"\0" * 256)
    return p


def apr_file(tmp: Path, models) -> Path:
    p = tmp / "model.apr"
    p.write_bytes(b"APRN" + os.urandom(64))
    return p


def random_bytes(tmp: Path, models) -> Path:
    p = tmp / "random.bin"
    data = bytearray(os.urandom(4096))
    data[0:4] = b"\x13\x37\xbe\xef"  # never a magic
    data[8] = 0x00  # never a SafeTensors '{'
    p.write_bytes(bytes(data))
    return p


def empty_file(tmp: Path, models) -> Path:
    p = tmp / "empty.gguf"
    p.write_bytes(b"")
    return p


def two_ggufs(tmp: Path, models) -> Path:
    d = tmp / "two-ggufs"
    copy_model(models.gguf("qwen2", "Q8_0"), d / "a-Q8_0.gguf")
    copy_model(models.gguf("qwen2", "Q4_0"), d / "a-Q4_0.gguf")
    return d


def missing_path(tmp: Path, models) -> Path:
    return tmp / "does-not-exist"


CORPUS: list[tuple[Callable[[Path, object], Path], str]] = [
    (st_huge_header, "header length 8000000000000000000 exceeds the 100000000-byte limit"),
    (st_header_not_json, "header is not valid JSON"),
    (st_offsets_past_end, "data offsets 0..400 run past the end"),
    (st_truncated, "run past the end"),
    (index_missing_shard, "shard model-00002-of-00002.safetensors named in the index is missing"),
    (index_tensor_not_in_shard, "tensor 'model.norm.weight' is mapped to shard"),
    (index_shard_outside_dir, "is outside the model directory"),
    (gguf_bad_version, "unsupported GGUF version 99"),
    (gguf_version_1, "unsupported GGUF version 1"),
    (gguf_absurd_tensor_count, "absurd tensor count 4611686018427387904"),
    (gguf_string_past_eof, "string length 1099511627776 runs past the end of the file"),
    (gguf_array_past_eof, "array of 1125899906842624 strings runs past the end"),
    (gguf_truncated_tensor_data, "runs past the end of the"),
    (gguf_unknown_tensor_type, "unknown type 4242"),
    (apr_file, "APR models are not supported; convert to SafeTensors or GGUF"),
    (random_bytes, "unknown model format (first bytes: 13 37 be ef"),
    (empty_file, "file is empty"),
    (two_ggufs, "several .gguf files (a-Q4_0.gguf, a-Q8_0.gguf); pick one with --quant"),
    (missing_path, "no such file or directory"),
]


@pytest.mark.parametrize(("build", "reason"), CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_bad_file_is_refused_with_exit_2_one_line_fast_and_small(
    build, reason, tmp_path, tiny_models, capsys
):
    path = build(tmp_path, tiny_models)
    capsys.readouterr()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = main(["inspect", str(path)])
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert reason in lines[0]
    assert path.name in lines[0]
    assert "Traceback" not in err
    assert elapsed < 1.0
    assert peak < 16 * 2**20, f"peak allocation {peak} bytes"


def test_console_script_refuses_bad_file_without_traceback(tmp_path):
    path = apr_file(tmp_path, None)
    proc = subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"modeldeploy inspect: error: {path}: APR models are not supported; "
        "convert to SafeTensors or GGUF"
    ]
