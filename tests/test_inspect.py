"""`modeldeploy inspect`: the JSON a user (and GET /model, GET /tensors) gets for a model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from fixtures.tiny_models import ARCHS, SPECS, copy_model, hf_weights
from modeldeploy.server.cli import main
from modeldeploy.server.formats.inspect import inspect_path


def _run_inspect(capsys, *args: str) -> dict:
    capsys.readouterr()
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    return json.loads(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sharded", [False, True])
def test_inspect_tiny_hf_model(tiny_models, capsys, arch, sharded):
    spec = SPECS[arch]
    info = _run_inspect(capsys, tiny_models.hf(arch, sharded=sharded))
    assert info["format"] == ("safetensors-sharded" if sharded else "safetensors")
    assert info["architecture"] == arch and info["supported"] is True
    assert info["config"]["num_layers"] == spec.layers
    assert info["config"]["head_dim"] == spec.head_dim
    assert info["has_chat_template"] is True and info["has_tokenizer"] is True
    weights = hf_weights(arch)
    tensors = {t["name"]: t for t in info["tensors"]}
    assert set(tensors) == set(weights)
    for name, array in weights.items():
        assert tensors[name]["shape"] == list(array.shape)
        assert tensors[name]["dtype"] == "F32"
        assert tensors[name]["bytes"] == array.nbytes
    assert info["tensor_count"] == len(weights)
    assert info["total_bytes"] == sum(a.nbytes for a in weights.values())
    assert len(info["files"]) == (2 if sharded else 1)
    assert (
        info["metadata"]["config.json"]["model_type"]
        == json.loads((tiny_models.hf(arch) / "config.json").read_text())["model_type"]
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F16", "Q4_0"])
def test_inspect_tiny_gguf(tiny_models, capsys, arch, qtype):
    spec = SPECS[arch]
    path = tiny_models.gguf(arch, qtype)
    info = _run_inspect(capsys, path)
    assert info["format"] == "gguf" and info["architecture"] == arch
    assert info["has_chat_template"] is True and info["has_tokenizer"] is True
    assert info["tokenizer_model"] == "gpt2"
    tensors = {t["name"]: t for t in info["tensors"]}
    q = tensors["blk.0.attn_q.weight"]
    assert q["shape"] == [spec.heads * spec.head_dim, spec.hidden]
    assert q["dtype"] == qtype
    assert tensors["token_embd.weight"]["shape"][1] == spec.hidden
    assert tensors["output_norm.weight"]["dtype"] == "F32"
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["total_bytes"] < path.stat().st_size
    tokens = info["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["type"] == "array" and tokens["length"] == info["config"]["vocab_size"]
    assert len(tokens["head"]) == 8
    assert info["metadata"][f"{arch}.block_count"] == spec.layers
    assert info["gguf"]["version"] == 3


def test_inspect_directory_with_quant_and_no_tensors(tiny_models, capsys, tmp_path):
    d = tmp_path / "repo"
    copy_model(tiny_models.gguf("qwen3", "Q8_0"), d / "tiny-Q8_0.gguf")
    copy_model(tiny_models.gguf("qwen3", "F16"), d / "tiny-F16.gguf")
    info = _run_inspect(capsys, d, "--quant", "q8_0", "--no-tensors")
    assert info["path"].endswith("tiny-Q8_0.gguf")
    assert "tensors" not in info and info["tensor_count"] > 0


def test_inspect_describes_an_architecture_we_do_not_serve(tiny_models, capsys, tmp_path):
    d = copy_model(tiny_models.hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "phi3"
    (d / "config.json").write_text(json.dumps(cfg))
    info = _run_inspect(capsys, d)
    assert info["architecture"] == "phi3" and info["supported"] is False
    assert info["config"] is None and info["tensor_count"] == len(hf_weights("llama"))


def test_inspect_output_is_plain_json(tiny_models):
    info = inspect_path(tiny_models.gguf("gemma3", "Q8_0"))
    text = json.dumps(info, allow_nan=False)  # no numpy objects, no NaN
    assert json.loads(text) == info
    assert not any(isinstance(v, np.ndarray) for v in info["metadata"].values())


def test_inspect_real_qwen_gguf(qwen_gguf, capsys):
    info = _run_inspect(capsys, qwen_gguf)
    assert info["architecture"] == "qwen2" and info["tensor_count"] == 291
    assert info["has_chat_template"] is True and info["has_tokenizer"] is True
    assert info["metadata"]["tokenizer.ggml.tokens"]["length"] == 151936
    assert info["metadata"]["tokenizer.ggml.merges"]["length"] == 151387
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["token_embd.weight"]["shape"] == [151936, 896]
    assert tensors["blk.0.attn_k.weight"]["shape"] == [128, 896]
    assert set(info["gguf"]["quant_types"]) == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert 460 * 2**20 < info["total_bytes"] < qwen_gguf.stat().st_size


def test_inspect_real_gemma_gguf(gemma_gguf, capsys):
    info = _run_inspect(capsys, gemma_gguf)
    assert info["architecture"] == "gemma3" and info["tensor_count"] == 236
    assert info["has_chat_template"] is False and info["has_tokenizer"] is True
    assert info["tokenizer_model"] == "llama"
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["blk.0.attn_q.weight"]["shape"] == [1024, 640]
    assert tensors["blk.0.attn_output.weight"]["dtype"] == "Q4_K"
    assert info["config"]["layer_types"][5] == "full_attention"


def test_inspect_real_qwen_is_well_under_a_second(qwen_gguf):
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        inspect_path(qwen_gguf)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, timings  # ~0.15 s on an idle core


def test_inspect_console_script_on_real_qwen(qwen_gguf):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.cli", "inspect", str(qwen_gguf), "--no-tensors"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["num_layers"] == 24
    assert elapsed < 10  # includes interpreter start and imports


def test_inspect_index_json_path_directly(tiny_models, capsys):
    # the sharded-SafeTensors case study: the index file itself must not be read as a header
    index = tiny_models.hf("qwen2", sharded=True) / "model.safetensors.index.json"
    info = _run_inspect(capsys, index)
    assert info["format"] == "safetensors-sharded" and info["architecture"] == "qwen2"
    assert sorted({t["file"] for t in info["tensors"]}) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
