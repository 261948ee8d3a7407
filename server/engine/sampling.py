"""Per-request sampling: parameters, logit processors and token choice for a batch.

Each running sequence brings its own `SamplingParams` and `torch.Generator`, so one
batched forward serves requests with different temperatures, penalties and seeds,
and a seeded request draws the same random numbers whatever else shares its batch.
The order follows llama.cpp/vLLM: penalties on the raw logits, then temperature,
top-k, top-p, min-p, then a draw. Logprobs describe the model's raw distribution
(before penalties and temperature), as OpenAI's API reports them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from modeldeploy.server.engine.errors import InvalidSamplingParamsError

MAX_TOP_LOGPROBS = 20
#: Candidates top-p looks at before falling back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 1024
#: Temperatures below this sample greedily: dividing logits by, say, 1e-300 overflows to
#: inf, softmax turns inf - inf into NaN and the draw fails (which would poison the model),
#: while any temperature this small already puts all the mass on the top token.
MIN_TEMPERATURE = 1e-5
#: Bound on a penalized logit: a repetition_penalty of 1e-300 would otherwise make it inf.
#: Far beyond any real logit, and still finite after division by MIN_TEMPERATURE.
PENALIZED_LOGIT_LIMIT = 1e4


@dataclass
class SamplingParams:
    """What one request asks of the sampler; `temperature == 0` (or below
    `MIN_TEMPERATURE`) means greedy.

    `max_tokens=None` generates until a stop condition or the context is full.
    `repeat_last_n` is the window of recent tokens (prompt included) the repetition
    penalty looks at: 0 disables it, -1 means the whole context (llama.cpp semantics).
    Presence/frequency penalties count generated tokens only (OpenAI semantics).
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> None:
        """Refuse out-of-range values with one line naming the parameter."""

        def bad(name: str, why: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"{name}={getattr(self, name)!r}: {why}")

        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.repeat_last_n < -1:
            raise bad("repeat_last_n", "must be -1 (whole context), 0 (off) or positive")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be between -2 and 2")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop sequences must be non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop sequences")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return (
            (self.repetition_penalty != 1.0 and self.repeat_last_n != 0)
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class TokenChoice:
    """The sampled token and, when asked, its logprob and the top alternatives."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class RequestSampler:
    """Sampling state of one sequence: params, its generator, tokens seen so far."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.output_counts: dict[int, int] = {}

    def record(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    def penalize(self, row: torch.Tensor) -> torch.Tensor:
        """Repetition (multiplicative, recent window) and presence/frequency (additive)."""
        p = self.params
        if p.repetition_penalty != 1.0 and p.repeat_last_n != 0:
            history = self.prompt_ids + self.output_ids
            if p.repeat_last_n > 0:
                history = history[-p.repeat_last_n :]
            if history:
                ids = torch.tensor(sorted(set(history)), device=row.device)
                vals = row[ids]
                penalized = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
                row[ids] = penalized.clamp(-PENALIZED_LOGIT_LIMIT, PENALIZED_LOGIT_LIMIT)
        if (p.presence_penalty or p.frequency_penalty) and self.output_counts:
            ids = torch.tensor(list(self.output_counts), device=row.device)
            counts = torch.tensor(
                list(self.output_counts.values()), device=row.device, dtype=row.dtype
            )
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
        return row

    def choose(self, row: torch.Tensor) -> int:
        """Draw a token from one (already penalized) float32 logits row."""
        if self.params.greedy:
            return int(row.argmax())
        idx, probs = candidates(row, self.params)
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return int(idx[choice]) if idx is not None else choice


def candidates(row: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token ids (None = the whole vocabulary) and their unnormalised sampling weights after
    temperature, top-k, top-p and min-p (that order, as transformers and vLLM apply them).

    Works on the few tokens that can survive instead of sorting the whole vocabulary (24 ms
    per row for 152k tokens here): top-p first tries the `TOP_P_CANDIDATES` best tokens and
    falls back to a full sort only when their share of the full distribution is below top_p,
    so the result is exact.
    """
    row = row / p.temperature
    vocab = row.shape[-1]
    idx: torch.Tensor | None = None
    if 0 < p.top_k < vocab:
        vals, idx = torch.topk(row, p.top_k)  # sorted, descending
        probs = vals.softmax(-1)
    elif p.top_p < 1.0:
        lse = torch.logsumexp(row, -1)
        vals, idx = torch.topk(row, min(vocab, TOP_P_CANDIDATES))
        probs = (vals - lse).exp()
        if float(probs.sum()) < p.top_p:  # a flat distribution: the nucleus is wider
            vals, idx = row.sort(descending=True)
            probs = (vals - lse).exp()
    else:
        probs = row.softmax(-1)
    if p.top_p < 1.0:  # sorted descending; shares of the whole (or top-k) distribution
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before > p.top_p, 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return idx, probs


def sample_batch(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[TokenChoice]:
    """One token per row of `logits` (B, V) float32, each row under its own sampler."""
    want_logprobs = any(s.params.logprobs for s in samplers)
    logprobs = logits.log_softmax(-1) if want_logprobs else None
    plain_greedy = all(s.params.greedy and not s.params.penalized for s in samplers)
    if plain_greedy:
        ids = logits.argmax(-1).tolist()
    else:
        ids = []
        for i, s in enumerate(samplers):
            row = logits[i]
            if s.params.penalized:
                row = s.penalize(row.clone())
            ids.append(s.choose(row))
    out: list[TokenChoice] = []
    for i, (tok, s) in enumerate(zip(ids, samplers, strict=True)):
        choice = TokenChoice(tok)
        if s.params.logprobs and logprobs is not None:
            choice.logprob = float(logprobs[i, tok])
            if s.params.top_logprobs:
                vals, idx = logprobs[i].topk(s.params.top_logprobs)
                choice.top = list(zip(idx.tolist(), vals.tolist(), strict=True))
        s.record(tok)
        out.append(choice)
    return out
