"""Detection, the GGUF parser, SafeTensors validation and config normalization.

Oracles: gguf-py's `GGUFReader` for the GGUF structure, transformers' own dequantizers for
quantized data, the `safetensors` library for SafeTensors, and for configs the tiny models'
known shapes plus the rule that an HF directory and the GGUF derived from it (and transformers'
re-saved config) normalize to the same model.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time

import numpy as np
import pytest
from fixtures.tiny_models import ARCHS, GGUF_QTYPES, SPECS, hf_weights
from modeldeploy.server.errors import FormatError, UnsupportedArchitectureError
from modeldeploy.server.formats import (
    GGUFFile,
    ModelFormat,
    SafeTensorsModel,
    config_from_gguf,
    config_from_hf,
    detect_format,
    open_model,
    open_model_files,
    resolve_model_path,
)
from modeldeploy.server.formats.gguf_file import GGUFTensor

gguf = pytest.importorskip("gguf")


# ------------------------------------------------------------------------------- detection


def test_index_json_is_detected_by_name_before_reading_bytes(tmp_path):
    # the case-study bug: '{"weight' read as a header length. Here the bytes do not even exist.
    unreadable = tmp_path / "model.safetensors.index.json"
    assert detect_format(unreadable) is ModelFormat.SAFETENSORS_SHARDED


def test_detect_by_magic(tiny_models):
    assert detect_format(tiny_models.gguf("qwen2")) is ModelFormat.GGUF
    assert detect_format(tiny_models.hf("qwen2") / "model.safetensors") is ModelFormat.SAFETENSORS


@pytest.mark.parametrize("magic", [b"APR\0", b"APR1", b"APR2", b"APRN"])
def test_apr_magics_are_refused(tmp_path, magic):
    p = tmp_path / "m.bin"
    p.write_bytes(magic + b"\x01" * 20)
    with pytest.raises(FormatError, match="APR models are not supported; convert to SafeTensors"):
        detect_format(p)


def test_directory_resolution(tiny_models, tmp_path):
    assert resolve_model_path(tiny_models.hf("llama")).name == "model.safetensors"
    sharded = tiny_models.hf("llama", sharded=True)
    assert resolve_model_path(sharded).name == "model.safetensors.index.json"
    gguf_file = tiny_models.gguf("llama", "Q8_0")
    assert resolve_model_path(gguf_file.parent) == gguf_file
    both = tmp_path / "both"
    both.mkdir()
    for q in ("Q8_0", "Q4_0"):
        (both / f"tiny-{q}.gguf").write_bytes(tiny_models.gguf("llama", q).read_bytes())
    assert resolve_model_path(both, "q4_0").name == "tiny-Q4_0.gguf"
    with pytest.raises(FormatError, match=r"several \.gguf files .* pick one with --quant"):
        resolve_model_path(both)
    with pytest.raises(FormatError, match=r"no .gguf file matches quant 'Q6_K' \(found: "):
        resolve_model_path(both, "Q6_K")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="no model weights"):
        resolve_model_path(empty)


# ------------------------------------------------------------------------------- GGUF


def _reader_value(field):
    value = field.contents()
    return value


@pytest.mark.parametrize("qtype", GGUF_QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_parser_agrees_with_gguf_reader(tiny_models, arch, qtype):
    path = tiny_models.gguf(arch, qtype)
    ours = GGUFFile.open(path)
    reader = gguf.GGUFReader(path)
    assert ours.version == 3
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.ggml_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape.tolist()))
        assert mine.n_elements == theirs.n_elements
        assert mine.n_bytes == theirs.n_bytes
        assert mine.offset == theirs.data_offset
        assert np.array_equal(
            np.asarray(ours.raw(mine.name)).view(np.uint8).ravel(),
            np.asarray(theirs.data).view(np.uint8).ravel(),
        )
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected = _reader_value(reader.fields[key])
        got = ours.metadata[key]
        if isinstance(got, np.ndarray):
            got = got.tolist()
        if isinstance(expected, float):  # ours: the shortest float32 decimal
            assert np.float32(got) == np.float32(expected), key
        else:
            assert got == expected, key


@pytest.mark.parametrize(("qtype", "tolerance"), [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 0.02)])
def test_gguf_dequantize_gives_back_the_hf_weights(tiny_models, qtype, tolerance):
    # qwen2: no q/k permutation and no norm offset, so GGUF tensors map 1:1 to HF ones
    g = GGUFFile.open(tiny_models.gguf("qwen2", qtype))
    hf = hf_weights("qwen2")
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
        "blk.1.attn_q.bias": "model.layers.1.self_attn.q_proj.bias",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gname, hname in pairs.items():
        got = g.dequantize(gname)
        assert got.dtype == np.float32
        assert got.shape == hf[hname].shape
        assert np.max(np.abs(got - hf[hname])) <= tolerance, gname


def test_gguf_q4_0_dequantize_matches_transformers_dequantizer(tiny_models):
    torch = pytest.importorskip("torch")
    tdq = pytest.importorskip("transformers.integrations.gguf.dequant")
    g = GGUFFile.open(tiny_models.gguf("llama", "Q4_0"))  # untied: output is Q8_0
    types = {t.type_name for t in g.tensors}
    assert {"Q4_0", "Q8_0", "F32"} <= types
    for t in g.tensors:
        if t.type_name in ("Q4_0", "Q8_0"):
            raw = torch.from_numpy(np.array(g.raw(t.name)).ravel())
            ref = tdq.dequantize(raw, int(t.ggml_type)).numpy().reshape(t.shape)
            np.testing.assert_array_equal(g.dequantize(t.name), ref)


def test_gguf_raw_is_a_zero_copy_view(tiny_models):
    g = GGUFFile.open(tiny_models.gguf("llama", "F16"))
    view = g.raw("blk.0.attn_q.weight")
    assert view.dtype == np.float16 and view.shape == (64, 64)
    assert not view.flags.writeable
    assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)
    q = GGUFFile.open(tiny_models.gguf("llama", "Q4_0")).raw("blk.0.ffn_down.weight")
    assert q.dtype == np.uint8 and q.shape == (64, 128 // 32 * 18)


def test_gguf_llama_q_rows_are_permuted_like_llama_cpp(tiny_models):
    g = GGUFFile.open(tiny_models.gguf("llama", "F32"))
    hf = hf_weights("llama")["model.layers.0.self_attn.q_proj.weight"]
    got = g.dequantize("blk.0.attn_q.weight")
    assert not np.array_equal(got, hf)
    heads = SPECS["llama"].heads
    # undo llama.cpp's permutation the way transformers' GGUF loader does
    restored = got.reshape(heads, -1, 2, got.shape[1]).swapaxes(1, 2).reshape(got.shape)
    np.testing.assert_array_equal(restored, hf)


def test_gguf_v2_file_parses_like_v3(tiny_models, tmp_path):
    src = tiny_models.gguf("qwen2", "Q8_0")
    data = bytearray(src.read_bytes())
    struct.pack_into("<I", data, 4, 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    a, b = GGUFFile.open(src), GGUFFile.open(v2)
    assert (a.version, b.version) == (3, 2)
    assert a.tensors == b.tensors
    np.testing.assert_array_equal(
        a.dequantize("blk.0.attn_k.weight"), b.dequantize("blk.0.attn_k.weight")
    )


def test_gguf_big_endian_is_refused_clearly(tmp_path):
    p = tmp_path / "be.gguf"
    p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + b"\0" * 16)
    with pytest.raises(FormatError, match="big-endian GGUF files are not supported"):
        GGUFFile.open(p)


def test_gguf_string_arrays_stay_available(tiny_models):
    from tokenizers import Tokenizer

    g = GGUFFile.open(tiny_models.gguf("qwen3", "F32"))
    tokens = g.metadata["tokenizer.ggml.tokens"]
    merges = g.metadata["tokenizer.ggml.merges"]
    tok = Tokenizer.from_file(str(tiny_models.hf("qwen3") / "tokenizer.json"))
    assert tokens[tok.token_to_id("<think>")] == "<think>"
    assert len(merges) == len(json.loads(tok.to_str())["model"]["merges"])
    assert all(isinstance(m, str) and " " in m for m in merges)
    types = g.metadata["tokenizer.ggml.token_type"]
    assert types[tok.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tok.token_to_id("<think>")] == gguf.TokenType.USER_DEFINED


def test_real_gguf_parses_well_under_a_second(qwen_gguf, gemma_gguf):
    for path, n_tensors, vocab in ((qwen_gguf, 291, 151936), (gemma_gguf, 236, 262144)):
        best = min(_timed(GGUFFile.open, path)[0] for _ in range(3))
        g = GGUFFile.open(path)
        assert len(g.tensors) == n_tensors
        assert len(g.metadata["tokenizer.ggml.tokens"]) == vocab
        assert best < 1.0, f"{path.name}: {best:.3f} s"  # ~0.1 s on an idle core


@pytest.mark.slow
def test_real_gguf_tensor_list_agrees_with_gguf_reader(qwen_gguf):
    # qwen: the 152k-token vocabulary and merges that make GGUFReader slow (~10 s alone)
    for path in (qwen_gguf,):
        ours = GGUFFile.open(path)
        reader = gguf.GGUFReader(path)
        assert [(t.name, t.ggml_type, t.shape, t.n_bytes, t.offset) for t in ours.tensors] == [
            (
                t.name,
                t.tensor_type,
                tuple(int(d) for d in reversed(t.shape.tolist())),
                int(t.n_bytes),
                int(t.data_offset),
            )
            for t in reader.tensors
        ]
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            mine = ours.metadata[key]
            if len(field.data) > 1 or isinstance(mine, list | np.ndarray):
                # spot-check long arrays: contents() on 152k entries alone takes ~20 s
                assert len(mine) == len(field.data), key
                for i in (0, 1, len(field.data) // 2, len(field.data) - 1):
                    part = field.parts[field.data[i]]
                    theirs = bytes(part).decode() if isinstance(mine[i], str) else part[0]
                    assert mine[i] == theirs, (key, i)
            elif isinstance(mine, float):
                assert np.float32(mine) == np.float32(field.contents()), key
            else:
                assert mine == field.contents(), key


def test_real_gguf_k_quants_dequantize_like_transformers(gemma_gguf):
    torch = pytest.importorskip("torch")
    tdq = pytest.importorskip("transformers.integrations.gguf.dequant")
    g = GGUFFile.open(gemma_gguf)
    seen = set()
    for t in g.tensors:
        # transformers' dequantizer has no Q5_0; the other three cover blocks and super-blocks
        if t.type_name in ("Q4_K", "Q6_K", "Q8_0") and t.type_name not in seen:
            if t.n_elements > 4_000_000:
                continue
            seen.add(t.type_name)
            raw = torch.from_numpy(np.array(g.raw(t.name)).ravel())
            ref = tdq.dequantize(raw, int(t.ggml_type)).numpy().reshape(t.shape)
            np.testing.assert_allclose(g.dequantize(t.name), ref, rtol=1e-6, atol=1e-6)
    assert seen == {"Q4_K", "Q6_K", "Q8_0"}


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------- SafeTensors


@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_model_matches_the_safetensors_library(tiny_models, sharded):
    from safetensors import safe_open

    model = SafeTensorsModel.open(resolve_model_path(tiny_models.hf("qwen3", sharded=sharded)))
    weights = hf_weights("qwen3")
    assert set(model.tensors) == set(weights)
    assert len(model.files) == (2 if sharded else 1)
    assert model.config["model_type"] == "qwen3"
    for name, info in model.tensors.items():
        with safe_open(str(info.file), framework="np") as f:
            assert list(f.get_slice(name).get_shape()) == list(info.shape)
        assert info.dtype == "F32"
        assert info.nbytes == weights[name].nbytes
    np.testing.assert_array_equal(
        model.get_tensor("model.norm.weight", "np"), weights["model.norm.weight"]
    )
    assert model.total_bytes == sum(w.nbytes for w in weights.values())


def test_safetensors_bfloat16_dtype_is_reported(tiny_models):
    model = SafeTensorsModel.open(tiny_models.hf("gemma3", dtype="bfloat16") / "model.safetensors")
    assert {t.dtype for t in model.tensors.values()} == {"BF16"}


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_dir_and_derived_gguf_normalize_to_the_same_model(tiny_models, arch):
    hf = open_model(tiny_models.hf(arch)).config
    for qtype in ("F32", "Q4_0"):
        gg = open_model(tiny_models.gguf(arch, qtype)).config
        hf_fields = dataclasses.asdict(hf)
        gg_fields = dataclasses.asdict(gg)
        hf_eos, gg_eos = set(hf_fields.pop("eos_token_ids")), set(gg_fields.pop("eos_token_ids"))
        assert gg_fields == hf_fields
        assert gg_eos and gg_eos <= hf_eos


def test_tiny_configs_have_the_expected_shapes(tiny_models):
    llama = open_model(tiny_models.hf("llama")).config
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (2, 4, 2, 16)
    assert not llama.tie_word_embeddings and llama.rope_theta == 500000.0
    qwen2 = open_model(tiny_models.hf("qwen2")).config
    assert qwen2.attention_bias and qwen2.tie_word_embeddings and qwen2.sliding_window is None
    assert qwen2.vocab_size == 448  # padded beyond the tokenizer, as Qwen does
    qwen3 = open_model(tiny_models.hf("qwen3")).config
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.attention_bias
    gemma = open_model(tiny_models.hf("gemma3")).config
    assert gemma.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert (gemma.sliding_window, gemma.rope_local_theta, gemma.rope_theta) == (16, 10000.0, 1e6)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.query_pre_attn_scalar == 32.0
    # generation_config.json adds its stop ids to config.json's
    assert set(qwen2.eos_token_ids) == {
        json.loads((tiny_models.hf("qwen2") / "generation_config.json").read_text())[
            "eos_token_id"
        ][i]
        for i in (0, 1)
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_resaved_config_normalizes_the_same(tiny_models, arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    hub_style = json.loads((tiny_models.hf(arch) / "config.json").read_text())
    resaved = transformers.AutoConfig.from_pretrained(tiny_models.hf(arch)).to_dict()
    assert "rope_parameters" in resaved
    assert config_from_hf(resaved) == config_from_hf(hub_style)


HUB_CONFIGS = {
    # shapes of well-known public configs (hub spelling), scaled to what matters here
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "mistral-7b-v0.1": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "eos_token_id": 151645,
    },
    "gemma-3-4b-multimodal": {
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
            "vocab_size": 262208,
        },
    },
}


def test_hub_configs_normalize():
    llama = config_from_hf(HUB_CONFIGS["llama-3.2-1b"])
    assert llama.rope_scaling == {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert llama.eos_token_ids == [128001, 128008, 128009] and llama.tie_word_embeddings
    mistral = config_from_hf(HUB_CONFIGS["mistral-7b-v0.1"])
    assert (mistral.sliding_window, mistral.layer_types, mistral.head_dim) == (4096, None, 128)
    moe = config_from_hf(HUB_CONFIGS["qwen3-30b-a3b"])
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (128, 8, 768)
    assert moe.norm_topk_prob and moe.qk_norm and moe.sliding_window is None
    v5 = {k: v for k, v in HUB_CONFIGS["qwen3-30b-a3b"].items() if k != "num_experts"}
    moe5 = config_from_hf({**v5, "num_local_experts": 128})  # transformers 5's name
    assert (moe5.num_experts, moe5.num_experts_per_tok) == (128, 8)
    gemma = config_from_hf(HUB_CONFIGS["gemma-3-4b-multimodal"])
    assert gemma.architecture == "gemma3" and gemma.num_layers == 34
    assert gemma.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert gemma.layer_types.count("full_attention") == 34 // 6
    assert gemma.eos_token_ids == [1, 106] and gemma.tie_word_embeddings


def test_unsupported_and_broken_configs_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'bert' is not supported"):
        config_from_hf({"model_type": "bert"})
    broken = dict(HUB_CONFIGS["mistral-7b-v0.1"], num_key_value_heads=5)
    with pytest.raises(FormatError, match="not a multiple of num_key_value_heads 5"):
        config_from_hf(broken)
    with pytest.raises(FormatError, match="'hidden_size' must be an integer"):
        config_from_hf(dict(HUB_CONFIGS["mistral-7b-v0.1"], hidden_size="big"))
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'phi3' is not supported"):
        config_from_gguf({"general.architecture": "phi3"})
    with pytest.raises(FormatError, match=r"'llama\.embedding_length' missing"):
        config_from_gguf({"general.architecture": "llama"})


def test_real_qwen_gguf_config(qwen_gguf):
    files = open_model(qwen_gguf)
    c = files.config
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        "qwen2",
        896,
        24,
        14,
        2,
    )
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.rope_theta) == (64, 4864, 151936, 1e6)
    assert c.attention_bias and not c.qk_norm and not c.tie_word_embeddings
    assert c.eos_token_ids == [151645, 151643]
    assert files.gguf.chat_template.startswith("{%- if tools %}")


def test_real_gemma_gguf_config(gemma_gguf):
    c = open_model(gemma_gguf).config
    assert (c.architecture, c.hidden_size, c.num_layers, c.head_dim, c.num_kv_heads) == (
        "gemma3",
        640,
        18,
        256,
        1,
    )
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta) == (512, 1e6, 10000.0)
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"
    assert c.query_pre_attn_scalar == 256.0 and c.qk_norm and c.tie_word_embeddings
    assert c.eos_token_ids == [1, 106]


def test_embedding_shape_must_match_config(tiny_models, tmp_path):
    from fixtures.tiny_models import copy_model

    d = copy_model(tiny_models.hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"embedding shape \[384, 64\] does not match"):
        open_model(d)


def test_unsupported_architecture_opens_for_inspection_only(tiny_models, tmp_path):
    from fixtures.tiny_models import copy_model

    d = copy_model(tiny_models.hf("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "phi3"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError):
        open_model(d)
    files = open_model_files(d, strict=False)
    assert files.config is None and files.architecture == "phi3"


def test_gguf_tensor_record_is_what_the_contract_names(tiny_models):
    t = GGUFFile.open(tiny_models.gguf("llama", "Q4_0")).tensor("blk.0.attn_q.weight")
    assert isinstance(t, GGUFTensor)
    assert (t.ggml_type, t.shape, t.n_elements, t.n_bytes) == (
        gguf.GGMLQuantizationType.Q4_0,
        (64, 64),
        4096,
        4096 // 32 * 18,
    )


def test_gguf_rope_freqs_tensor_is_reported_as_rope_scaling(tiny_models):
    g = GGUFFile.open(tiny_models.gguf("llama", "F32"))
    names = [t.name for t in g.tensors]
    assert config_from_gguf(g.metadata, names).rope_scaling is None
    scaled = config_from_gguf(g.metadata, [*names, "rope_freqs.weight"])
    assert scaled.rope_scaling == {"rope_type": "rope_freqs", "tensor": "rope_freqs.weight"}
