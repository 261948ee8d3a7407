"""Filling a `Transformer` from SafeTensors or GGUF tensors, one tensor at a time.

Each checkpoint tensor maps to a slice of one of our parameters (q/k/v land in rows of
the fused `wqkv`, gate/up in `w13`, experts in a stacked tensor). A tensor is read
(memory-mapped), converted to the target dtype and copied into its slice before the
next one is touched, so peak memory stays near the final model size even when a GGUF
tensor has to be dequantized.

GGUF quirks handled here, because llama.cpp's converter introduced them:
- `llama`-architecture files store q/k rows permuted for interleaved RoPE; we undo it
  (qwen2/qwen3/gemma3 files are written unpermuted).
- Gemma files store RMSNorm weights as (1 + w); our Gemma norm adds the 1 itself.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from modeldeploy.server.engine import dequant
from modeldeploy.server.engine.model import Transformer
from modeldeploy.server.errors import FormatError

Progress = Callable[[int, int, str], None]

#: GGUF architectures whose q/k weights llama.cpp's converter permuted.
GGUF_PERMUTED_ARCHS = ("llama", "mistral")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: parameter name, row offset, expert index."""

    param: str
    part: str | None = None  # "q"/"k"/"v" of wqkv, "gate"/"up" of w13
    expert: int | None = None


_HF_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")

_HF_LAYER_MAP: dict[str, Target] = {
    "self_attn.q_proj.weight": Target("attn.wqkv.weight", "q"),
    "self_attn.k_proj.weight": Target("attn.wqkv.weight", "k"),
    "self_attn.v_proj.weight": Target("attn.wqkv.weight", "v"),
    "self_attn.q_proj.bias": Target("attn.wqkv.bias", "q"),
    "self_attn.k_proj.bias": Target("attn.wqkv.bias", "k"),
    "self_attn.v_proj.bias": Target("attn.wqkv.bias", "v"),
    "self_attn.o_proj.weight": Target("attn.wo.weight"),
    "self_attn.o_proj.bias": Target("attn.wo.bias"),
    "self_attn.q_norm.weight": Target("attn.q_norm.weight"),
    "self_attn.k_norm.weight": Target("attn.k_norm.weight"),
    "mlp.gate_proj.weight": Target("mlp.w13.weight", "gate"),
    "mlp.up_proj.weight": Target("mlp.w13.weight", "up"),
    "mlp.down_proj.weight": Target("mlp.w2.weight"),
    "mlp.gate.weight": Target("mlp.gate.weight"),
    "input_layernorm.weight": Target("attn_norm.weight"),
    "pre_feedforward_layernorm.weight": Target("ffn_norm.weight"),
    "post_feedforward_layernorm.weight": Target("post_ffn_norm.weight"),
}

_GGUF_LAYER_MAP: dict[str, Target] = {
    "attn_q.weight": Target("attn.wqkv.weight", "q"),
    "attn_k.weight": Target("attn.wqkv.weight", "k"),
    "attn_v.weight": Target("attn.wqkv.weight", "v"),
    "attn_q.bias": Target("attn.wqkv.bias", "q"),
    "attn_k.bias": Target("attn.wqkv.bias", "k"),
    "attn_v.bias": Target("attn.wqkv.bias", "v"),
    "attn_output.weight": Target("attn.wo.weight"),
    "attn_output.bias": Target("attn.wo.bias"),
    "attn_q_norm.weight": Target("attn.q_norm.weight"),
    "attn_k_norm.weight": Target("attn.k_norm.weight"),
    "attn_norm.weight": Target("attn_norm.weight"),
    "ffn_norm.weight": Target("ffn_norm.weight"),
    "post_attention_norm.weight": Target("post_attn_norm.weight"),
    "post_ffw_norm.weight": Target("post_ffn_norm.weight"),
    "ffn_gate.weight": Target("mlp.w13.weight", "gate"),
    "ffn_up.weight": Target("mlp.w13.weight", "up"),
    "ffn_down.weight": Target("mlp.w2.weight"),
    "ffn_gate_inp.weight": Target("mlp.gate.weight"),
    "ffn_gate_exps.weight": Target("mlp.w13", "gate"),
    "ffn_up_exps.weight": Target("mlp.w13", "up"),
    "ffn_down_exps.weight": Target("mlp.w2"),
}

_GGUF_TOP_MAP: dict[str, Target] = {
    "token_embd.weight": Target("embed.weight"),
    "output_norm.weight": Target("norm.weight"),
    "output.weight": Target("lm_head.weight"),
}

#: Checkpoint tensors we knowingly do not use (RoPE caches and factors we recompute).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rope_factors)")


def hf_target(name: str, model: Transformer) -> Target | None:
    """Our destination for a Hugging Face tensor name, or None for one we do not use."""
    for prefix in _HF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name == "embed_tokens.weight":
        return Target("embed.weight")
    if name == "norm.weight":
        return Target("norm.weight")
    if name == "lm_head.weight":
        return Target("lm_head.weight")
    m = _HF_LAYER.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "post_attention_layernorm.weight":
        # Gemma's sandwich norm follows attention; elsewhere the same name is the pre-MLP norm.
        param = "post_attn_norm.weight" if model.spec.sandwich_norms else "ffn_norm.weight"
        return Target(f"layers.{layer}.{param}")
    if e := _HF_EXPERT.match(rest):
        kind = e.group(2)
        param = "mlp.w2" if kind == "down_proj" else "mlp.w13"
        part = {"gate_proj": "gate", "up_proj": "up"}.get(kind)
        return Target(f"layers.{layer}.{param}", part, int(e.group(1)))
    t = _HF_LAYER_MAP.get(rest)
    return Target(f"layers.{layer}.{t.param}", t.part) if t else None


def gguf_target(name: str) -> Target | None:
    """Our destination for a GGUF tensor name (`blk.N.*` and the top-level ones)."""
    if name in _GGUF_TOP_MAP:
        return _GGUF_TOP_MAP[name]
    if not name.startswith("blk."):
        return None
    _, layer, rest = name.split(".", 2)
    t = _GGUF_LAYER_MAP.get(rest)
    return Target(f"layers.{layer}.{t.param}", t.part) if t else None


def _part_rows(model: Transformer, param: str, part: str | None) -> tuple[int, int] | None:
    """(offset, length) along the output dimension for a fused part, None for the whole."""
    if part is None:
        return None
    spec = model.spec
    if part in ("q", "k", "v"):
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[part]
    inter = spec.moe_intermediate_size if spec.num_experts else spec.intermediate_size
    return (0, inter) if part == "gate" else (inter, inter)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute` of q/k rows (interleaved -> halves RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Filler:
    """Copies tensors into a model's parameters and checks that every element got filled."""

    def __init__(self, model: Transformer, source: str) -> None:
        self.model = model
        self.source = source
        self.params = dict(model.named_parameters(remove_duplicate=True))
        self.filled: dict[str, int] = {}

    def put(self, target: Target, tensor: torch.Tensor, name: str) -> None:
        param = self.params.get(target.param)
        if param is None:
            raise FormatError(
                f"{self.source}: tensor '{name}' has no place in a "
                f"{self.model.spec.architecture} model ({target.param})"
            )
        dest = param.data
        if target.expert is not None:
            dest = dest[target.expert]
        span = _part_rows(self.model, target.param, target.part)
        if span is not None:
            axis = dest.dim() - 2 if dest.dim() >= 2 else 0
            dest = dest.narrow(axis, *span)
        if tuple(dest.shape) != tuple(tensor.shape):
            raise FormatError(
                f"{self.source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)} for {target.param}"
            )
        dest.copy_(tensor)
        self.filled[target.param] = self.filled.get(target.param, 0) + tensor.numel()

    def finish(self) -> None:
        """Tie the output head if the checkpoint has none; refuse partially filled models."""
        model = self.model
        if "lm_head.weight" not in self.filled and "lm_head.weight" in self.params:
            model.lm_head.weight = model.embed.weight
            self.filled["lm_head.weight"] = model.embed.weight.numel()
        missing = [n for n, p in self.params.items() if self.filled.get(n, 0) != p.numel()]
        if missing:
            raise FormatError(
                f"{self.source}: checkpoint lacks {len(missing)} tensors the "
                f"{model.spec.architecture} model needs, e.g. {', '.join(missing[:3])}"
            )


def load_safetensors(
    model: Transformer, st: Any, source: str, progress: Progress | None = None
) -> None:
    """Fill `model` from a (sharded) SafeTensors checkpoint via mmap'd `safe_open`."""
    from safetensors import safe_open

    filler = Filler(model, source)
    names_by_file: dict[Path, list[str]] = {}
    for info in st.tensors.values():
        names_by_file.setdefault(Path(info.file), []).append(info.name)
    total = sum(len(v) for v in names_by_file.values())
    done = 0
    for file, names in names_by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                target = hf_target(name, model)
                done += 1
                if target is None:
                    if _IGNORED.search(name) or name == "lm_head.weight":
                        continue
                    raise FormatError(f"{source}: unexpected tensor '{name}' in {file.name}")
                if target.param == "lm_head.weight" and model.spec.tie_word_embeddings:
                    continue
                filler.put(target, f.get_tensor(name), name)
                if progress:
                    progress(done, total, "tensors")
    filler.finish()


def gguf_tensor(gguf: Any, info: Any) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in numpy (HF) order, dequantized if needed.

    Plain float types come as zero-copy views of the mmap'd file (read-only, hence the
    silenced warning: we only ever read them into our own parameters); common quant types
    are decoded by our torch kernels, the rest by gguf-py through the formats layer.
    """
    from gguf import GGMLQuantizationType as Q

    raw = gguf.raw(info.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if info.ggml_type in (Q.F32, Q.F16, Q.BF16):
            if info.ggml_type == Q.BF16:
                return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(raw)
        fast = dequant.dequantize(torch.from_numpy(raw_2d(raw)), info.type_name)
    if fast is not None:
        return fast.reshape(tuple(info.shape))
    return torch.from_numpy(gguf.dequantize(info.name))


def raw_2d(raw: np.ndarray) -> np.ndarray:
    """Quantized bytes as (rows, bytes_per_row), the layout the torch decoders take."""
    return raw.reshape(-1, raw.shape[-1])


def load_gguf(
    model: Transformer,
    gguf: Any,
    arch: str,
    source: str,
    progress: Progress | None = None,
    skip: Collection[str] = (),
) -> None:
    """Fill `model` from a GGUF file, undoing llama.cpp's q/k permutation and norm shift.

    `skip` names GGUF tensors already consumed elsewhere (quant.quantize_gguf_model built
    their layers straight from the file's bytes), so they are neither read nor expected.
    """
    spec = model.spec
    filler = Filler(model, source)
    permuted = arch in GGUF_PERMUTED_ARCHS
    total = len(gguf.tensors)
    for done, info in enumerate(gguf.tensors, 1):
        if info.name in skip:
            continue
        if info.name == "rope_freqs.weight":
            model.set_rope_factors(gguf_tensor(gguf, info))
            continue
        target = gguf_target(info.name)
        if target is None:
            if _IGNORED.search(info.name):
                continue
            raise FormatError(f"{source}: unexpected GGUF tensor '{info.name}'")
        t = gguf_tensor(gguf, info)
        if permuted and target.part in ("q", "k") and t.dim() == 2:
            t = unpermute_qk(t, spec.num_heads if target.part == "q" else spec.num_kv_heads)
        if spec.norm_unit_offset and info.name.endswith("norm.weight"):
            t = t.float() - 1.0
        filler.put(target, t, info.name)
        if progress:
            progress(done, total, "tensors")
    filler.finish()


def iter_tensor_rows(model_files: Any) -> Iterator[dict[str, Any]]:
    """Source tensors as {name, dtype, shape} rows for `/tensors` (no data read)."""
    if model_files.gguf is not None:
        for t in model_files.gguf.tensors:
            yield {"name": t.name, "dtype": t.ggml_type.name, "shape": list(t.shape)}
    elif model_files.safetensors is not None:
        for t in model_files.safetensors.tensors.values():
            yield {"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)}
