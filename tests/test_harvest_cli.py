"""`modeldeploy harvest`: JSON on stdout and exit 0, or exit 2 with one line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubServer
from modeldeploy.server.harvest import read_record
from test_sources import DEAD_ENDPOINT, seed_cache


def _harvest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.cli", "harvest", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"W")
    return model


def test_harvest_prints_the_result_json(tmp_path: Path) -> None:
    model = _model(tmp_path)
    proc = _harvest(str(model), "--slug-root", str(tmp_path / "slugs"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {
        "slug",
        "slug_dir",
        "source",
        "snapshot_dirs",
        "weight_files",
        "model_path",
        "linked_files",
        "elapsed_s",
    }
    assert result["snapshot_dirs"] == [str(model)]
    assert result["weight_files"] == [str(model / "model.safetensors")]
    assert sorted(result["linked_files"]) == ["config.json", "tokenizer.json"]
    assert read_record(result["slug_dir"]).to_dict() == result


@pytest.mark.parametrize(
    ("source", "extra", "expected"),
    [
        ("s3://bucket/model", [], "unknown scheme 's3://'"),
        ("models/relative", [], "relative paths"),
        ("{tmp}/does-not-exist", [], "no such file or directory"),
        ("{tmp}/ggufs", [], "several .gguf files; pass --quant"),
        ("{tmp}/ggufs", ["--quant", "Q"], "--quant 'Q' matches several"),
        ("{tmp}/ggufs", ["--quant", "Q5"], "no .gguf file matches --quant 'Q5'"),
        ("pvc://models/qwen", [], "operator"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, source: str, extra: list[str], expected: str
) -> None:
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "m-Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "ggufs" / "m-Q8_0.gguf").write_bytes(b"GGUF")
    proc = _harvest(source.format(tmp=tmp_path), "--slug-root", str(tmp_path / "s"), *extra)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    if "gguf" in expected:
        assert "m-Q4_0.gguf, m-Q8_0.gguf" in lines[0]


def test_offline_from_a_seeded_cache(tmp_path: Path) -> None:
    """An air-gapped cluster: HF_HUB_OFFLINE=1, the cache pre-seeded, no hub to reach."""
    cache = tmp_path / "cache"
    seed_cache(cache, "org/Tiny", {"config.json": b"{}", "model.safetensors": b"W"})
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": DEAD_ENDPOINT, "HF_HUB_CACHE": str(cache)}
    proc = _harvest("hf://org/Tiny", "--slug-root", str(tmp_path / "slugs"), env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert Path(result["model_path"]).read_bytes() == b"W"
    assert list(result["linked_files"]) == ["config.json"]

    proc = _harvest("hf://org/Other", "--slug-root", str(tmp_path / "slugs"), env=env)
    assert proc.returncode == 2 and "not in the cache" in proc.stderr


def test_hf_token_is_used_and_never_printed(tmp_path: Path) -> None:
    secret = "hf_do_not_print_me_123"
    root = tmp_path / "hub"
    (root / "org" / "Private").mkdir(parents=True)
    (root / "org" / "Private" / "model.safetensors").write_bytes(b"P")
    (root / "org" / "Private" / "config.json").write_text("{}")
    with HubServer(root, tokens={"org/Private": secret}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": secret}
        args = (
            "hf://org/Private",
            "--slug-root",
            str(tmp_path / "s"),
            "--cache-dir",
            str(tmp_path),
        )
        proc = _harvest(*args, "--log-level", "DEBUG", env=env)
        assert proc.returncode == 0, proc.stderr
        denied = _harvest(*args, env={**env, "HF_TOKEN": "hf_wrong_token"})
    assert secret not in proc.stdout + proc.stderr
    assert denied.returncode == 2 and "hf_wrong_token" not in denied.stdout + denied.stderr
