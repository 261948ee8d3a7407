"""Our decoder against Hugging Face transformers on every tiny architecture and file format.

transformers is the oracle (test extra only): it loads the same SafeTensors directory, or the
same GGUF file through `gguf_file=` (dequantized by gguf-py, like ours), so any difference is
the engine's. Both run in float32; the tolerance is 1e-4 absolute on logits of magnitude ~4
(observed: 0 to 2e-6), and 20 greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect, hf_greedy, one_torch_thread, prompt_logits, run
from modeldeploy.server.engine.engine import Engine

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
#: Long enough to cross gemma3's 16-token sliding window in the tiny model.
PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b"
LOGIT_TOL = 1e-4

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    yield from one_torch_thread()


def hf_from_gguf(path):
    """transformers loading a GGUF, with `head_dim` from `attention.key_length`.

    transformers' GGUF config mapping ignores key_length, so for qwen3 (head_dim != hidden /
    heads) it builds the wrong shapes, and for gemma3 it leaves query_pre_attn_scalar at 256
    where llama.cpp scales by 1/sqrt(key_length) (all sizes but 27B). The metadata says the
    truth, so we pass it on; the real gemma-3-270m has key_length 256 either way.
    """
    from modeldeploy.server.formats.gguf_file import GGUFFile

    meta = GGUFFile.open(path).metadata
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    key_length = meta.get(f"{meta['general.architecture']}.attention.key_length")
    if key_length:
        config.head_dim = int(key_length)
        if config.model_type.startswith("gemma3"):
            config.query_pre_attn_scalar = int(key_length)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    )


def _check(engine: Engine, hf_model) -> None:
    ids = engine.encode(PROMPT)
    assert len(ids) > 20
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    ours = prompt_logits(engine, ids)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < LOGIT_TOL, f"max abs logit diff {diff}"
    want = hf_greedy(hf_model, ids, 20)
    got = run(collect(engine, ids, temperature=0.0, max_tokens=20, ignore_eos=True))
    assert got.token_ids == want
    assert got.finish_reason == "length"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_safetensors_matches_transformers(tiny_models, arch: str, sharded: bool) -> None:
    path = tiny_models.hf(arch, sharded=sharded)
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=2, max_model_len=128)
    try:
        assert engine.info()["format"].startswith("safetensors")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _check(engine, hf)
    finally:
        engine.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_transformers(tiny_models, arch: str, qtype: str) -> None:
    path = tiny_models.gguf(arch, qtype)
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=2, max_model_len=128)
    try:
        assert engine.info()["format"] == "gguf"
        hf = hf_from_gguf(path)
        _check(engine, hf)
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_bfloat16_stays_close_to_float32(tiny_models, arch: str) -> None:
    """bf16 (what --dtype auto picks on this CPU) tracks the float32 logits within 0.15."""
    path = tiny_models.hf(arch)
    ids = None
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine.load(path, dtype=dtype, device="cpu", max_concurrent=1, max_model_len=128)
        try:
            ids = engine.encode(PROMPT)
            logits[dtype] = prompt_logits(engine, ids)
            assert engine.info()["dtype"] == dtype
        finally:
            engine.close()
    diff = (logits["float32"] - logits["bfloat16"]).abs().max().item()
    assert diff < 0.15, f"bf16 vs f32 max abs logit diff {diff}"


def _variant(tiny_models, tmp_path, arch: str, **config):
    """A copy of a tiny HF model with config.json fields replaced."""
    import json

    from fixtures.tiny_models import copy_model

    d = copy_model(tiny_models.hf(arch), tmp_path / "variant")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "arch, config",
    [
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        (
            "llama",
            {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 8},
        ),
    ],
    ids=["llama3-rope", "linear-rope", "mistral-sliding"],
)
def test_config_variants_match_transformers(tiny_models, tmp_path, arch, config) -> None:
    path = _variant(tiny_models, tmp_path, arch, **config)
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=1, max_model_len=128)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _check(engine, hf)
    finally:
        engine.close()


def _random_hf_model(tiny_models, tmp_path, config, **extra_json):
    """A random transformers model saved in hub layout, with the tiny qwen3 tokenizer beside it
    (for layouts the tiny fixtures do not cover). Weights get a useful scale: the default
    init is so small that every logit is ~0."""
    import json
    import shutil

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    out = tmp_path / config.model_type
    hf.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(extra_json)
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models.hf("qwen3") / name, out / name)
    return hf, out


SMALL = {
    "vocab_size": 448,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def test_qwen3_moe_matches_transformers(tiny_models, tmp_path) -> None:
    """qwen3_moe has no tiny fixture; experts are stored one by one, as on the hub."""
    cfg = transformers.Qwen3MoeConfig(
        **SMALL,
        moe_intermediate_size=32,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    # hub spelling (transformers 5 writes num_local_experts)
    hf, path = _random_hf_model(tiny_models, tmp_path, cfg, num_experts=8)
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=1, max_model_len=128)
    try:
        assert engine.spec.num_experts == 8
        _check(engine, hf)
    finally:
        engine.close()


def test_llama_with_attention_biases_matches_transformers(tiny_models, tmp_path) -> None:
    """llama's `attention_bias` puts biases on q, k, v and o (qwen2's only on q, k, v)."""
    cfg = transformers.LlamaConfig(**SMALL, attention_bias=True)
    hf, path = _random_hf_model(tiny_models, tmp_path, cfg)
    engine = Engine.load(path, dtype="float32", device="cpu", max_concurrent=1, max_model_len=128)
    try:
        assert engine.model.layers[0].attn.wo.bias is not None
        _check(engine, hf)
    finally:
        engine.close()
