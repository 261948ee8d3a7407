"""One model description for every format: `NormalizedConfig`, from HF config.json or GGUF metadata.

The engine builds a model from this and nothing else, so the two sources must agree on meaning:
HF `model_type` names for the architecture, rope and sliding-window settings spelled one way,
and every default that a file may leave out filled in here, from the reference implementations
(transformers' config classes for HF files, llama.cpp's loader for GGUF files). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from modeldeploy.server.errors import FormatError, UnsupportedArchitectureError

#: Architectures the engine implements, by HF model_type.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "qwen3_moe")

#: HF model_type spellings -> our architecture name.
_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "qwen3_moe": "qwen3_moe",
}

#: GGUF general.architecture -> our architecture name (llama.cpp writes mistral as llama).
_GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "qwen3moe": "qwen3_moe",
}

#: Token texts llama.cpp treats as end-of-generation wherever they occur in a vocabulary.
EOG_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)

#: The tensor in which llama.cpp stores Llama 3.1+ rope scaling (per-frequency divisors).
ROPE_FREQS_TENSOR = "rope_freqs.weight"

SLIDING = "sliding_attention"
FULL = "full_attention"

#: llama.cpp hard-codes gemma3's layer pattern: every 6th layer attends globally.
GEMMA3_SLIDING_PATTERN = 6
#: and its local rope base (a GGUF may say otherwise under rope.freq_base_swa).
GEMMA3_LOCAL_ROPE_THETA = 10000.0


@dataclass
class NormalizedConfig:
    """What the engine needs to build a decoder-only transformer, independent of file format.

    Conventions: `head_dim` is the per-head q/k/v width; `num_kv_heads` < `num_heads` means
    grouped-query attention. `rope_scaling` is None for plain rope, else a dict with
    `rope_type` ('linear', 'dynamic', 'yarn', 'llama3', ...) and that type's parameters in HF
    spelling; from a GGUF with a `rope_freqs.weight` tensor it is {'rope_type': 'rope_freqs',
    'tensor': 'rope_freqs.weight'}: divide each rope frequency by that tensor's entries.
    `layer_types` (per layer 'sliding_attention' | 'full_attention') is None when all
    layers are alike; then `sliding_window`, when set, applies to every layer (Mistral style).
    `rope_local_theta` is the rope base of sliding layers where it differs (gemma3).
    `attention_bias`: q/k/v projections carry biases (qwen2; llama/mistral `attention_bias`
    also puts one on o_proj). `qk_norm`: per-head RMSNorm on q and k (qwen3, gemma3).
    `query_pre_attn_scalar`: attention scores are scaled by its inverse square root instead of
    head_dim's (gemma). Gemma3 norm weights are offsets from 1 in HF files; see the GGUF note
    in `config_from_gguf`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the shape `inspect` and GET /model print)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# HF config.json


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, list | tuple):
        return [int(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
    return []


def _int(cfg: Mapping[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise FormatError(f"{what}: '{key}' must be an integer, got {value!r}")
    if value <= 0:
        raise FormatError(f"{what}: '{key}' must be positive, got {value!r}")
    return int(value)


def _float(cfg: Mapping[str, Any], key: str, what: str, default: float | None) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FormatError(f"{what}: '{key}' must be a number, got {value!r}")
    return float(value)


def _opt_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _rope_from_hf(cfg: Mapping[str, Any], arch: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta) from either spelling HF configs use:
    the hub's `rope_theta` + `rope_scaling` (+ gemma3 `rope_local_base_freq`), or
    transformers 5's `rope_parameters` (flat, or per layer type for gemma3)."""
    default_theta = 1000000.0 if arch == "gemma3" else 10000.0
    params = cfg.get("rope_parameters")
    local_theta: float | None = None
    if isinstance(params, Mapping) and isinstance(params.get(FULL), Mapping):
        full, local = params[FULL], params.get(SLIDING) or {}
        theta = float(full.get("rope_theta", cfg.get("rope_theta", default_theta)))
        scaling = dict(full)
        if isinstance(local, Mapping) and local.get("rope_theta") is not None:
            local_theta = float(local["rope_theta"])
    elif isinstance(params, Mapping):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", default_theta)))
        scaling = dict(params)
    else:
        theta = float(cfg.get("rope_theta") or default_theta)
        raw = cfg.get("rope_scaling")
        scaling = dict(raw) if isinstance(raw, Mapping) else {}
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    if arch == "gemma3" and local_theta is None:
        local_theta = float(cfg.get("rope_local_base_freq") or GEMMA3_LOCAL_ROPE_THETA)
    for value in (theta, local_theta):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"rope base {value!r} is not a positive number")
    return theta, (scaling or None), local_theta


def _layer_types_from_hf(
    cfg: Mapping[str, Any], arch: str, num_layers: int
) -> tuple[int | None, list[str] | None]:
    window = cfg.get("sliding_window")
    window = int(window) if isinstance(window, int) and window > 0 else None
    types = cfg.get("layer_types")
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        if not cfg.get("use_sliding_window", False) or window is None:
            return None, None
        if not (isinstance(types, list) and len(types) == num_layers):
            first = int(cfg.get("max_window_layers", num_layers))
            types = [SLIDING if i >= first else FULL for i in range(num_layers)]
    elif arch == "gemma3":
        if not (isinstance(types, list) and len(types) == num_layers):
            pattern = int(cfg.get("sliding_window_pattern") or GEMMA3_SLIDING_PATTERN)
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    elif arch in ("llama", "mistral"):
        return (window if arch == "mistral" else None), None
    if isinstance(types, list):
        bad = [t for t in types if t not in (SLIDING, FULL)]
        if bad or len(types) != num_layers:
            raise FormatError(
                f"config.json: layer_types must list {num_layers} of "
                f"'{SLIDING}'/'{FULL}', got {types!r}"
            )
        if SLIDING not in types:
            return None, None
        return window, list(types)
    return None, None


def config_from_hf(config: Mapping[str, Any], *, source: str = "config.json") -> NormalizedConfig:
    """Normalize a Hugging Face `config.json` dict; raise for unsupported or broken configs.

    A multimodal gemma3 config is read through its `text_config`. `source` names the file in
    error messages. Any malformed value is a FormatError naming `source`, never a crash.
    """
    try:
        return _hf_config(config, source)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise FormatError(f"{source}: invalid config ({type(exc).__name__}: {exc})") from None


def _hf_config(config: Mapping[str, Any], source: str) -> NormalizedConfig:
    """config_from_hf's body; malformed values may raise TypeError/ValueError here."""
    if not isinstance(config, Mapping):
        raise FormatError(f"{source}: expected a JSON object")
    model_type = config.get("model_type")
    cfg: Mapping[str, Any] = config
    if model_type == "gemma3" and isinstance(config.get("text_config"), Mapping):
        cfg = {**config["text_config"], "model_type": "gemma3_text"}
        for key in ("bos_token_id", "eos_token_id"):
            if cfg.get(key) is None and config.get(key) is not None:
                cfg[key] = config[key]
    arch = _HF_MODEL_TYPES.get(str(model_type))
    if arch is None:
        raise UnsupportedArchitectureError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    layers = _int(cfg, "num_hidden_layers", source)
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = _int(cfg, "num_key_value_heads", source, default=heads)
    head_default = 256 if arch == "gemma3" else hidden // heads
    head_dim = _int(cfg, "head_dim", source) if cfg.get("head_dim") is not None else head_default
    if heads % kv_heads:
        raise FormatError(
            f"{source}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    theta, scaling, local_theta = _rope_from_hf(cfg, arch)
    window, layer_types = _layer_types_from_hf(cfg, arch, layers)
    moe = arch == "qwen3_moe"
    # qwen2 always has q/k/v biases and no config key for them
    attention_bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
    tie_default = arch == "gemma3"
    return NormalizedConfig(
        architecture=arch,
        vocab_size=_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", source),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(cfg, "rms_norm_eps", source, 1e-6),
        rope_theta=theta,
        max_position_embeddings=_int(cfg, "max_position_embeddings", source, default=2048),
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=window,
        layer_types=layer_types,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        attention_bias=attention_bias,
        qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3"),
        query_pre_attn_scalar=(
            float(cfg.get("query_pre_attn_scalar") or head_dim) if arch == "gemma3" else None
        ),
        final_logit_softcapping=_opt_float(cfg.get("final_logit_softcapping")),
        attn_logit_softcapping=_opt_float(cfg.get("attn_logit_softcapping")),
        hidden_act=str(
            cfg.get("hidden_activation")
            or cfg.get("hidden_act")
            or ("gelu_pytorch_tanh" if arch == "gemma3" else "silu")
        ),
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=_ids(cfg.get("eos_token_id")),
        # transformers 4 writes num_experts for qwen3_moe, transformers 5 num_local_experts
        num_experts=(
            int(cfg.get("num_experts") or cfg["num_local_experts"])
            if moe and (cfg.get("num_experts") or cfg.get("num_local_experts"))
            else None
        ),
        num_experts_per_tok=(
            int(cfg["num_experts_per_tok"]) if moe and cfg.get("num_experts_per_tok") else None
        ),
        moe_intermediate_size=(
            int(cfg["moe_intermediate_size"]) if moe and cfg.get("moe_intermediate_size") else None
        ),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if moe else None,
    )


# --------------------------------------------------------------------------------------------
# GGUF metadata


def _scalar(value: Any) -> Any:
    """A per-layer GGUF array whose entries agree collapses to one value; others stay lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        if value and all(v == value[0] for v in value):
            return value[0]
        return value
    return value


def _eog_ids(metadata: Mapping[str, Any]) -> list[int]:
    """EOS plus every end-of-generation token llama.cpp would stop on, in a stable order."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        types = metadata.get("tokenizer.ggml.token_type")
        if types is not None and len(types) == len(tokens):
            # control/user-defined tokens only: a few hundred instead of the whole vocabulary
            candidates: Iterable[int] = (i for i, t in enumerate(types) if t != 1)
        else:
            candidates = range(len(tokens))
        wanted = set(EOG_TOKEN_TEXTS)
        for i in candidates:
            if tokens[i] in wanted and i not in ids:
                ids.append(i)
    return ids


def config_from_gguf(
    metadata: Mapping[str, Any],
    tensor_names: Iterable[str] | None = None,
    *,
    source: str = "GGUF",
) -> NormalizedConfig:
    """Normalize GGUF metadata the way llama.cpp's loader reads it.

    `tensor_names` (when given) settles what only the tensor list says: tied embeddings (no
    `output.weight`), q/k/v biases and q/k norms. Without it those follow the architecture's
    usual layout. Note for the engine: llama.cpp stores llama q/k rows permuted for interleaved
    rope pairs and gemma3 norm weights as 1 + w; this config describes the model, the tensors
    keep the file's layout.
    """
    try:
        return _gguf_config(metadata, tensor_names, source)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise FormatError(f"{source}: invalid metadata ({type(exc).__name__}: {exc})") from None


def _gguf_config(
    metadata: Mapping[str, Any], tensor_names: Iterable[str] | None, source: str
) -> NormalizedConfig:
    gguf_arch = metadata.get("general.architecture")
    arch = _GGUF_ARCHITECTURES.get(str(gguf_arch))
    if arch is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {gguf_arch!r} is not supported "
            f"(supported: {', '.join(sorted(_GGUF_ARCHITECTURES))})"
        )
    names = set(tensor_names) if tensor_names is not None else None
    p = f"{gguf_arch}."

    def need_int(key: str) -> int:
        value = _scalar(metadata.get(p + key))
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FormatError(f"{source}: metadata '{p}{key}' missing or not a positive integer")
        return value

    def opt(key: str) -> Any:
        return _scalar(metadata.get(p + key))

    hidden = need_int("embedding_length")
    heads = need_int("attention.head_count")
    kv_value = opt("attention.head_count_kv")
    kv_heads = heads if kv_value is None else kv_value
    if isinstance(kv_heads, list):
        kv_heads = max(kv_heads)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise FormatError(f"{source}: attention.head_count_kv {kv_value!r} does not divide heads")
    layers = need_int("block_count")
    head_dim = opt("attention.key_length") or hidden // heads
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = opt("vocab_size") or (len(tokens) if tokens is not None else None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise FormatError(f"{source}: no vocab size (neither {p}vocab_size nor a token list)")
    ffn = opt("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn)
    if not isinstance(ffn, int):
        raise FormatError(f"{source}: metadata '{p}feed_forward_length' missing")

    scaling: dict[str, Any] | None = None
    scaling_type = opt("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": str(scaling_type)}
        if opt("rope.scaling.factor") is not None:
            scaling["factor"] = float(opt("rope.scaling.factor"))
        if opt("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(
                opt("rope.scaling.original_context_length")
            )
        for key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            if opt(key) is not None:
                scaling[hf_key] = float(opt(key))

    if names is not None and ROPE_FREQS_TENSOR in names:
        # Llama 3.1+ GGUFs carry their rope scaling as precomputed per-frequency divisors
        # (llama.cpp: theta_i / rope_freqs[i]) instead of metadata.
        scaling = {"rope_type": "rope_freqs", "tensor": ROPE_FREQS_TENSOR, **(scaling or {})}

    window = opt("attention.sliding_window")
    window = int(window) if isinstance(window, int) and window > 0 else None
    layer_types: list[str] | None = None
    local_theta: float | None = None
    pattern = metadata.get(p + "attention.sliding_window_pattern")
    if arch == "gemma3":
        if pattern is not None and hasattr(pattern, "__len__") and len(pattern) == layers:
            layer_types = [SLIDING if bool(s) else FULL for s in pattern]
        else:
            every = int(pattern) if isinstance(pattern, int) and pattern > 0 else None
            every = every or GEMMA3_SLIDING_PATTERN
            layer_types = [SLIDING if (i + 1) % every else FULL for i in range(layers)]
        local_theta = float(opt("rope.freq_base_swa") or GEMMA3_LOCAL_ROPE_THETA)
        if window is None:
            layer_types = None
    else:
        window = None  # llama.cpp applies no window for these architectures

    if names is not None:
        tied = "output.weight" not in names
        bias = "blk.0.attn_q.bias" in names
        qk_norm = "blk.0.attn_q_norm.weight" in names
    else:
        tied = arch == "gemma3"
        bias = arch == "qwen2"
        qk_norm = arch in ("qwen3", "qwen3_moe", "gemma3")
    moe = arch == "qwen3_moe"
    scalar: float | None = None
    if arch == "gemma3":
        # llama.cpp: 1/sqrt(n_embd/n_head) for the 62-layer (27B) model, else 1/sqrt(head_dim)
        scalar = float(hidden // heads if layers == 62 else head_dim)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    return NormalizedConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(opt("attention.layer_norm_rms_epsilon") or 1e-6),
        rope_theta=float(opt("rope.freq_base") or (1000000.0 if arch == "gemma3" else 10000.0)),
        max_position_embeddings=int(opt("context_length") or 2048),
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=window if layer_types else None,
        layer_types=layer_types,
        tie_word_embeddings=tied,
        attention_bias=bias,
        qk_norm=qk_norm,
        query_pre_attn_scalar=scalar,
        final_logit_softcapping=_opt_float(opt("final_logit_softcapping")),
        attn_logit_softcapping=_opt_float(opt("attn_logit_softcapping")),
        hidden_act="gelu_pytorch_tanh" if arch == "gemma3" else "silu",
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=_eog_ids(metadata),
        num_experts=opt("expert_count") if moe else None,
        num_experts_per_tok=opt("expert_used_count") if moe else None,
        moe_intermediate_size=opt("expert_feed_forward_length") if moe else None,
        norm_topk_prob=True if moe else None,  # llama.cpp always renormalizes qwen3moe
    )
