"""One decoder-only transformer for every supported architecture, with a slot-based KV cache.

The families we serve differ in a handful of switches (biases on q/k/v, RMSNorm on q
and k per head, Gemma's (1+w) norms, sandwich norms, scaled embeddings, gelu-tanh,
sliding-window layers with their own RoPE base, a mixture-of-experts MLP), so one
readable module configured by `ModelSpec` replaces a file per family, gpt-fast style.

Batching: the KV cache holds `num_slots` independent sequences of up to `max_len`
positions. A forward pass takes tokens `(B, T)`, their absolute positions `(B, T)` and
the slot of each row; it writes the new keys/values at (slot, position) and attends
over positions `<= position` of the row's own slot. Stale entries from a previous
occupant of a slot are never visible because of that mask, so freeing a slot costs
nothing. Decode runs all sequences as one `(B, 1)` batch; prefill runs `(1, chunk)`.

Projections are fused (q|k|v and gate|up) because one big matmul beats two or three
small ones on both CPU and GPU; the loaders concatenate the checkpoint's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from modeldeploy.server.engine.memory import can_hand_back_pages, small_pages, zero_pages
from modeldeploy.server.errors import UnsupportedArchitectureError
from modeldeploy.server.formats.config import SUPPORTED_ARCHITECTURES
from torch import nn

#: "rope_freqs": a GGUF carries per-frequency divisors (llama 3.1+), see `set_rope_factors`.
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "rope_freqs")

#: Modules are built without storage and materialized on the target device by the loader
#: (passed explicitly: the `torch.device("meta")` context manager imports torch._dynamo, 2 s).
META = torch.device("meta")


def check_supported(architecture: str | None, source: str) -> str:
    """Return the HF architecture name, or raise naming what was found and what is supported."""
    arch = architecture or ""
    if not arch:
        raise UnsupportedArchitectureError(
            f"{source}: the model does not name its architecture (model_type / "
            f"general.architecture); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture '{architecture}'; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


@dataclass(frozen=True)
class ModelSpec:
    """Everything the module needs, derived once from the formats layer's NormalizedConfig."""

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
    rope_scaling: dict[str, Any] | None
    rope_local_theta: float | None
    sliding_window: int | None
    layer_sliding: tuple[bool, ...]
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q/k/v
    output_bias: bool  # bias on o_proj (llama/mistral/qwen3/gemma3 `attention_bias`, not qwen2)
    qk_norm: bool
    attn_scale: float
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    hidden_act: str
    norm_unit_offset: bool  # Gemma: y = norm(x) * (1 + w)
    sandwich_norms: bool  # Gemma 2/3: post-attention and post-ffn norms
    embed_scale: float | None  # Gemma: embeddings * sqrt(hidden)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    @classmethod
    def from_config(cls, cfg: Any, source: str = "model") -> ModelSpec:
        """Map the NormalizedConfig onto the switches above (the one place arch quirks live)."""
        arch = check_supported(cfg.architecture, source)
        gemma = arch == "gemma3"
        head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        layer_types = list(cfg.layer_types) if cfg.layer_types else None
        if layer_types is None:
            if gemma:  # Gemma 3 checkpoints without layer_types: 5 sliding, then 1 global
                layer_types = [
                    "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(cfg.num_layers)
                ]
            elif arch == "mistral" and cfg.sliding_window:
                layer_types = ["sliding_attention"] * cfg.num_layers
            else:
                layer_types = ["full_attention"] * cfg.num_layers
        sliding = tuple(t == "sliding_attention" for t in layer_types)
        if any(sliding) and not cfg.sliding_window:
            sliding = tuple(False for _ in sliding)
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        if scaling is not None:
            kind = scaling.get("rope_type") or scaling.get("type") or "default"
            if kind not in SUPPORTED_ROPE_SCALING:
                raise UnsupportedArchitectureError(
                    f"{source}: unsupported rope scaling '{kind}'; "
                    f"supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
                )
        qpas = getattr(cfg, "query_pre_attn_scalar", None)
        num_experts = int(getattr(cfg, "num_experts", 0) or 0) if arch == "qwen3_moe" else 0
        return cls(
            architecture=arch,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size or 0),
            num_layers=int(cfg.num_layers),
            num_heads=int(cfg.num_heads),
            num_kv_heads=int(cfg.num_kv_heads or cfg.num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(cfg.rope_theta),
            rope_scaling=scaling,
            rope_local_theta=(
                float(cfg.rope_local_theta) if getattr(cfg, "rope_local_theta", None) else None
            ),
            sliding_window=int(cfg.sliding_window) if cfg.sliding_window else None,
            layer_sliding=sliding,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            attention_bias=bool(cfg.attention_bias) or arch == "qwen2",
            output_bias=bool(cfg.attention_bias) and arch != "qwen2",
            qk_norm=bool(cfg.qk_norm) or arch in ("qwen3", "qwen3_moe", "gemma3"),
            attn_scale=float(qpas) ** -0.5 if (gemma and qpas) else head_dim**-0.5,
            final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None) or None,
            attn_logit_softcapping=getattr(cfg, "attn_logit_softcapping", None) or None,
            hidden_act=(cfg.hidden_act or ("gelu_pytorch_tanh" if gemma else "silu")),
            norm_unit_offset=gemma,
            sandwich_norms=gemma,
            embed_scale=math.sqrt(cfg.hidden_size) if gemma else None,
            num_experts=num_experts,
            num_experts_per_tok=int(getattr(cfg, "num_experts_per_tok", 0) or 0),
            moe_intermediate_size=int(getattr(cfg, "moe_intermediate_size", 0) or 0),
            norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", False)),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per position per sequence, per element size 1 (times dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


class Linear(nn.Linear):
    """nn.Linear without random initialisation: the loader overwrites every weight, and
    initialising on the meta device runs through torch._refs, importing torch._dynamo (7 s)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without random initialisation (see `Linear`)."""

    def reset_parameters(self) -> None:
        pass


def activation(name: str):
    """The MLP nonlinearity by its HF `hidden_act` name."""
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise UnsupportedArchitectureError(f"unsupported hidden_act '{name}'")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; Gemma's variant scales by (1 + w) in float32 too."""

    def __init__(self, dim: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=META), requires_grad=False)
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One aten call: a decode step runs 49 of these, and the six small ops of HF's
        # formula cost more than the arithmetic. In bf16 it differs from HF's rounding
        # (normalize in float32, cast, then scale) by at most one bf16 ulp.
        if self.unit_offset:
            w = 1.0 + self.weight.float()
            return F.rms_norm(x.float(), w.shape, w, self.eps).to(x.dtype)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(spec: ModelSpec, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for a RoPE base and optional scaling (float32)."""
    dim = spec.head_dim
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    return inv


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (B, T, 1, head_dim) for absolute positions, in float32 like HF.

    The sin's first half is negated so that `apply_rope` rotates with a roll instead of
    HF's slice-negate-concatenate (same values: negation is exact). Computed per step
    rather than tabulated: a (B, T) outer product is cheap, and a table for a 128k
    context would cost hundreds of MB.
    """
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by per-token cos/signed sin (B, T, 1, D), non-interleaved HF
    layout: x * cos + rotate_half(x) * sin, with rotate_half's sign folded into `sin`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Static per-layer K/V of shape (num_slots, kv_heads, max_len, head_dim).

    Allocated once at load so decoding never reallocates. A masked-out value row still
    enters `attn @ v`, and uninitialised memory may hold NaN, so every position a step
    reads must be finite; zeroing the whole cache by writing would make every slot's
    full context resident at once. On CPU the cache is instead zeroed by handing its
    pages back (`memory.zero_pages`): it reads as zeros and costs memory only where a
    sequence wrote, and a slot is handed back again when its sequence leaves
    (`release`), so a finished long prompt stops counting against the pod's memory.
    Elsewhere (a GPU) slots are zeroed by writing, lazily, up to the highest position a
    batch attends (`prepare`).
    """

    ZERO_CHUNK = 256

    def __init__(
        self, spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device
    ) -> None:
        shape = (num_slots, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        #: Zeroed by handing pages back (CPU with madvise), not by writing.
        self.paged = torch.device(device).type == "cpu" and can_hand_back_pages()
        if self.paged:
            for t in (*self.k, *self.v):
                small_pages(t)  # a slot touches only the positions it reached
                zero_pages(t)
        # positions [0, clean[s]) of slot s hold finite values
        self.clean = [max_len if self.paged else 0] * num_slots

    def prepare(self, slots: list[int], kv_len: int) -> None:
        """Make positions [0, kv_len) of these slots finite before a step reads them."""
        for s in slots:
            if self.clean[s] >= kv_len:
                continue
            end = min(self.max_len, -(-kv_len // self.ZERO_CHUNK) * self.ZERO_CHUNK)
            for t in (*self.k, *self.v):
                t[s, :, self.clean[s] : end].zero_()
            self.clean[s] = end

    def release(self, slot: int) -> None:
        """Hand a free slot's pages back (CPU): it reads as zeros, costs no memory."""
        if self.paged:
            for t in (*self.k, *self.v):
                zero_pages(t[slot])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of slot `src` into slot `dst` (slot compaction);
        what `dst` held beyond them is released first."""
        self.release(dst)
        if length > 0:
            for t in (*self.k, *self.v):
                t[dst, :, :length] = t[src, :, :length]
        self.clean[dst] = max(self.clean[dst], length)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class Step:
    """Per-forward bookkeeping shared by all layers (positions, slots, masks, rotary)."""

    positions: torch.Tensor  # (B, T) absolute positions
    write_slots: torch.Tensor  # (B, T) slot of each token
    read: slice | torch.Tensor  # slots of the rows: a slice when contiguous (no copy)
    kv_len: int  # attend over cache positions [0, kv_len)
    masks: dict[bool, torch.Tensor]  # sliding? -> (B, 1, T, kv_len) bool, True = attend
    rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]  # sliding? -> cos, sin (B, T, 1, D)
    hidden: dict[bool, torch.Tensor | None]  # sliding? -> ~mask, None when nothing is hidden


class Attention(nn.Module):
    """Grouped-query attention with fused qkv, optional biases, q/k norms and softcapping."""

    def __init__(self, spec: ModelSpec, sliding: bool) -> None:
        super().__init__()
        self.spec = spec
        self.sliding = sliding
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.sizes = (nh * hd, nkv * hd, nkv * hd)
        self.wqkv = Linear(spec.hidden_size, sum(self.sizes), bias=spec.attention_bias, device=META)
        self.wo = Linear(nh * hd, spec.hidden_size, bias=spec.output_bias, device=META)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps, spec.norm_unit_offset)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps, spec.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, step: Step, k_cache, v_cache) -> torch.Tensor:
        spec = self.spec
        b, t, _ = x.shape
        nh, nkv = spec.num_heads, spec.num_kv_heads
        qkv = self.wqkv(x).view(b, t, nh + 2 * nkv, spec.head_dim)
        cos, sin = step.rope[self.sliding]
        if self.q_norm is not None:
            q, k, v = qkv.split((nh, nkv, nkv), dim=2)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # q and k rotated in one go: a decode step is dominated by op count
            qk, v = qkv.split((nh + nkv, nkv), dim=2)
            q, k = apply_rope(qk, cos, sin).split((nh, nkv), dim=2)
        k_cache[step.write_slots, :, step.positions] = k.to(k_cache.dtype)
        v_cache[step.write_slots, :, step.positions] = v.to(v_cache.dtype)
        # one indexing op: slots as a tensor gather only the first kv_len positions
        keys = k_cache[step.read, :, : step.kv_len]
        values = v_cache[step.read, :, : step.kv_len]
        q = q.transpose(1, 2)
        if t == 1 or spec.attn_logit_softcapping:
            out = self._eager(q, keys, values, step.hidden[self.sliding]).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(
                q,
                keys.to(q.dtype),
                values.to(q.dtype),
                attn_mask=step.masks[self.sliding],
                scale=spec.attn_scale,
                enable_gqa=True,
            )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _eager(self, q, keys, values, hidden: torch.Tensor | None) -> torch.Tensor:
        """Grouped attention as two matmuls in the cache's dtype, softmax in float32.

        Used for decode (one query per sequence), where CPU SDPA is 2-15x slower in bf16
        (measured: 4.5 ms vs 0.3 ms for 8 sequences x 300 positions), and for models that
        tanh-cap attention scores, which SDPA cannot do. Query heads are grouped onto their
        shared KV head by a view, so K/V are never repeated. On CPU the cache is float32
        (`KVCache`): these small bf16 matmuls cost 2-3x their float32 versions there.
        `hidden` marks the masked-out positions; None when every row sees all of them.
        """
        spec = self.spec
        b, h, t, d = q.shape
        g = spec.num_heads // spec.num_kv_heads
        qg = q.reshape(b, spec.num_kv_heads, g * t, d).to(keys.dtype)
        scores = (qg @ keys.transpose(-1, -2)).float() * spec.attn_scale
        if spec.attn_logit_softcapping:
            cap = spec.attn_logit_softcapping
            scores = torch.tanh(scores / cap) * cap
        if hidden is not None:
            scores = scores.view(b, spec.num_kv_heads, g, t, -1)
            scores = scores.masked_fill(hidden[:, :, None], float("-inf"))
            scores = scores.view(b, spec.num_kv_heads, g * t, -1)
        probs = scores.softmax(-1).to(values.dtype)
        return (probs @ values).view(b, h, t, d)


class MLP(nn.Module):
    """Gated MLP with fused gate|up projection."""

    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.inter = inter
        self.w13 = Linear(hidden, 2 * inter, bias=False, device=META)
        self.w2 = Linear(inter, hidden, bias=False, device=META)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.inter, dim=-1)
        return self.w2(self.act(gate) * up)


class MoE(nn.Module):
    """Qwen3-MoE sparse MLP: softmax router, top-k experts, optional renormalisation."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        e, h, m = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.spec = spec
        self.gate = Linear(h, e, bias=False, device=META)
        self.w13 = nn.Parameter(torch.empty(e, 2 * m, h, device=META), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, m, device=META), requires_grad=False)
        self.act = activation(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(-1)
        weights, experts = probs.topk(self.spec.num_experts_per_tok, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        m = self.spec.moe_intermediate_size
        for e in experts.unique().tolist():
            rows, which = (experts == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[rows], self.w13[e]).split(m, dim=-1)
            y = F.linear(self.act(gate) * up, self.w2[e])
            out.index_add_(0, rows, y * weights[rows, which, None])
        return out.view(shape)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and MLP, with Gemma's extra post-norms."""

    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        eps, off = spec.rms_norm_eps, spec.norm_unit_offset
        self.attn_norm = RMSNorm(spec.hidden_size, eps, off)
        self.attn = Attention(spec, spec.layer_sliding[index])
        self.ffn_norm = RMSNorm(spec.hidden_size, eps, off)
        if spec.num_experts:
            self.mlp: nn.Module = MoE(spec)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act)
        if spec.sandwich_norms:
            self.post_attn_norm = RMSNorm(spec.hidden_size, eps, off)
            self.post_ffn_norm = RMSNorm(spec.hidden_size, eps, off)
        else:
            self.post_attn_norm = self.post_ffn_norm = None

    def forward(self, x: torch.Tensor, step: Step, k_cache, v_cache) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), step, k_cache, v_cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class Transformer(nn.Module):
    """The decoder. Built without storage; `materialize()` then let a loader fill it."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = Embedding(spec.vocab_size, spec.hidden_size, device=META)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_unit_offset)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, device=META)
        self.inv_freq: dict[bool, torch.Tensor] = {}
        #: The blocks' compiled decode graphs, (x, step, cache) -> x
        #: (`compiled.DecodeBlocks`, installed by `compiled.compile_decode`).
        self.decode_blocks: Callable[[torch.Tensor, Step, KVCache], torch.Tensor] | None = None

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate uninitialised parameters (the loader overwrites all) and RoPE frequencies."""
        self.to(dtype=dtype)  # still storage-less: free, and no float32 copy on the device
        # By hand rather than `to_empty`: its empty_like on meta tensors imports sympy
        # through torch._refs (0.4 s of every start).
        for m in self.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                    m._parameters[name] = nn.Parameter(empty, requires_grad=p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
        # A quantized head/embedding (quant.quantize_gguf_model) carries its own data,
        # already tied to token_embd's bytes: only plain layers share one Parameter.
        plain = isinstance(self.lm_head, nn.Linear) and isinstance(self.embed, nn.Embedding)
        if self.spec.tie_word_embeddings and plain:
            self.lm_head.weight = self.embed.weight
        spec = self.spec
        glob = rope_inv_freq(spec, spec.rope_theta, spec.rope_scaling).to(device)
        self.inv_freq = {False: glob}
        if any(spec.layer_sliding):
            # Gemma 3: local layers have their own base and no scaling.
            theta = spec.rope_local_theta
            local = rope_inv_freq(spec, theta, None).to(device) if theta else glob
            self.inv_freq[True] = local

    def set_rope_factors(self, factors: torch.Tensor) -> None:
        """Divide the global RoPE frequencies by a GGUF's `rope_freqs.weight` (llama.cpp)."""
        inv = self.inv_freq[False]
        if factors.numel() != inv.numel():
            raise UnsupportedArchitectureError(
                f"rope_freqs.weight has {factors.numel()} factors, expected {inv.numel()}"
            )
        self.inv_freq[False] = inv / factors.reshape(-1).float().to(inv.device)

    def step_for(self, positions: torch.Tensor, slots: list[int], dtype: torch.dtype) -> Step:
        """Masks, rotary slices and cache addressing for rows at `positions` in `slots`."""
        device = positions.device
        b, t = positions.shape
        kv_len = int(positions.max()) + 1
        if slots == list(range(slots[0], slots[0] + b)):
            read: slice | torch.Tensor = slice(slots[0], slots[0] + b)
        else:
            read = torch.tensor(slots, device=device)
        write = torch.tensor(slots, device=device)[:, None].expand(b, t)
        kpos = torch.arange(kv_len, device=device)
        causal = kpos[None, None, :] <= positions[:, :, None]
        masks = {False: causal[:, None]}
        rope = {s: rope_cos_sin(inv, positions, dtype) for s, inv in self.inv_freq.items()}
        window = self.spec.sliding_window or kv_len
        if True in self.inv_freq:
            near = (positions[:, :, None] - kpos[None, None, :]) < window
            masks[True] = (causal & near)[:, None]
        # Single-token rows that all sit at the last position see every cached position
        # (the usual single-stream decode): no mask to build or apply in 24+ layers.
        sees_all = t == 1 and bool((positions == kv_len - 1).all())
        hidden: dict[bool, torch.Tensor | None] = {
            s: None if sees_all and (not s or kv_len <= window) else ~m for s, m in masks.items()
        }
        return Step(positions, write, read, kv_len, masks, rope, hidden)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: list[int],
        cache: KVCache,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) for every token (B, T, V), or for `last_index[b]` of each row (B, V)."""
        x = self.embed(tokens)
        if self.spec.embed_scale is not None:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        step = self.step_for(positions, slots, x.dtype)
        cache.prepare(slots, step.kv_len)
        if tokens.shape[1] == 1 and self.decode_blocks is not None:
            x = self.decode_blocks(x, step, cache)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, step, cache.k[i], cache.v[i])
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index]
        logits = self.lm_head(self.norm(x)).float()
        cap = self.spec.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
