"""The tiny models every suite relies on are what transformers (the reference) says they are.

If these fail, every engine/tokenizer comparison built on the fixtures is meaningless, so the
fixtures are checked against transformers itself: the HF directory loads with no missing or
unexpected weights, and the GGUF derived from it, loaded by transformers with `gguf_file=`,
gives the same logits (exactly for F32) and the same token ids.
"""

from __future__ import annotations

import json
import time

import pytest
from fixtures.tiny_models import ARCHS, GGUF_QTYPES, make_gguf_model, make_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = "Hello world! café 日本 🙂 def f(x): return 42"

#: transformers' GGUF config mapping misses these for tiny shapes: qwen3 ignores
#: attention.key_length (falls back to its 128 default) and gemma3 has no key for
#: query_pre_attn_scalar (falls back to 256). Real models match those defaults.
GGUF_CONFIG_OVERRIDES = {"qwen3": {"head_dim": 32}, "gemma3": {"query_pre_attn_scalar": 32}}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_generation_takes_well_under_seconds(tmp_path):
    start = time.perf_counter()
    for arch in ARCHS:
        make_hf_model(tmp_path, arch)
        make_hf_model(tmp_path, arch, sharded=True)
        for q in GGUF_QTYPES:
            make_gguf_model(tmp_path, arch, q)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_dir_loads_in_transformers_without_missing_weights(tiny_models, arch):
    path = tiny_models.hf(arch)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32
    )
    assert {k: v for k, v in info.items() if v} == {}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "hi" in rendered and rendered != "hi"
    assert tok.eos_token is not None
    sharded = tiny_models.hf(arch, sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    sharded_model = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    assert torch.equal(_logits(model, ids), _logits(sharded_model, ids))


def test_bfloat16_copy_holds_the_same_numbers(tiny_models):
    f32 = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_models.hf("llama"), dtype=torch.float32
    )
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_models.hf("llama", dtype="bfloat16"), dtype=torch.float32
    )
    for (name, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_matches_hf_model_in_transformers(tiny_models, arch, qtype):
    hf = tiny_models.hf(arch)
    gguf_path = tiny_models.gguf(arch, qtype)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    gtok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = tok(TEXT)["input_ids"]
    assert gtok(TEXT)["input_ids"] == ids
    assert gtok.chat_template == tok.chat_template
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        **GGUF_CONFIG_OVERRIDES.get(arch, {}),
    )
    diff = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
    if qtype == "F32":
        assert diff == 0.0
    else:
        assert 0.0 < diff < 0.5
