"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file embeds.

A GGUF-only model has no `tokenizer.json`: llama.cpp stores the vocabulary, the merges (or,
for SentencePiece vocabularies, per-token scores) and the token types as metadata. We rebuild
the same tokenizer Hugging Face transformers builds from that metadata (its `gguf_file=` path
is our oracle in the tests), so ids agree with what the model was trained on, but without
transformers at run time and in a fraction of its time (it takes ~12 s for a 262k vocabulary;
the cost there is a Python sort over every candidate merge, which we avoid by emitting the
merges already in rank order).

Two vocabulary kinds cover the models we serve:

* `tokenizer.ggml.model = "gpt2"`: byte-level BPE with explicit merges. How text is split
  before BPE depends on the model family and is named by `tokenizer.ggml.pre`; the split
  regexes are the ones llama.cpp's `llama-vocab.cpp` applies for each name.
* `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (`<0xNN>` tokens)
  and `▁` for spaces. The file has no merges, so they are derived from the vocabulary: every
  split of a token into two tokens is a merge, ranked by the token's score, except for the
  Gemma family whose scores do not follow the merge order, where the file order is the rank.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so
both are matched whole in the input instead of being cut into pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
from modeldeploy.server.errors import FormatError
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

# llama.cpp's token types (gguf.TokenType); only these two change how a token is matched.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",  # noqa: RUF001
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)
_BLOOM = (r" ?[^(\s|.,!?…。，、।۔،)]+",)  # noqa: RUF001

#: `tokenizer.ggml.pre` -> the regexes llama.cpp splits with, applied one after the other (each
#: splits the pieces of the previous one). None: GPT-2's own split (ByteLevel's built-in regex),
#: which is also what an unknown name gets, as in transformers.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...] | None] = {
    **dict.fromkeys(
        (
            "gpt-2",
            "gpt2",
            "default",
            "phi-2",
            "jina-es",
            "jina-de",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "gigachat",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "a.x-4.0",
            "mellum",
        ),
        None,
    ),
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "dbrx",
            "smaug-bpe",
            "glm4",
            "chatglm-bpe",
            "jina-v5-nano",
        ),
        (_LLAMA3,),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo", "f2llmv2"),
        (_QWEN2,),
    ),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), (_GPT4O,)),
    "tekken": (_TEKKEN,),
    "deepseek-coder": _DEEPSEEK_CODER,
    "deepseek-v3": _DEEPSEEK_V3,
    "falcon": _FALCON,
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        _STARCODER,
    ),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _BLOOM),
    "viking": (*_BLOOM, r"\p{N}"),
}

#: Architectures whose SentencePiece scores do not follow the merge order (the file order does).
_RANK_BY_POSITION = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})

SUPPORTED_MODELS = ("gpt2", "llama")


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer the GGUF metadata describes, with BOS/EOS added as the file asks.

    `metadata` maps GGUF keys to values; arrays may be lists or numpy arrays, strings may be
    `str` or UTF-8 `bytes`. Raises FormatError when the vocabulary is missing or of a kind we
    do not build.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise FormatError("GGUF metadata has no tokenizer.ggml.tokens: no embedded tokenizer")
    tokens = _strings(metadata["tokenizer.ggml.tokens"])
    types = _ints(metadata.get("tokenizer.ggml.token_type"), len(tokens))
    arch = str(metadata.get("general.architecture", ""))
    if kind == "gpt2":
        tokenizer, vocab_tokens = _byte_level(tokens, metadata)
    elif kind == "llama":
        tokenizer, vocab_tokens = _sentencepiece(tokens, metadata, arch)
    else:
        raise FormatError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODELS)})"
        )
    _add_marked_tokens(
        tokenizer, tokens, vocab_tokens, types, metadata, byte_level=kind == "gpt2", arch=arch
    )
    tokenizer.post_processor = _post_processor(tokens, metadata, kind)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# the two vocabulary kinds


def _byte_level(tokens: list[str], metadata: Mapping[str, Any]) -> tuple[Tokenizer, list[str]]:
    """Byte-level BPE (GPT-2 family): the file's merges, a split regex by `tokenizer.ggml.pre`."""
    spelling = byte_alphabet()
    alphabet = frozenset(spelling.values())
    # llama.cpp writes tokens in the byte alphabet already; respell any that are not (raw text).
    spelled = [
        t if alphabet.issuperset(t) else "".join(spelling[b] for b in t.encode("utf-8"))
        for t in tokens
    ]
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" not in metadata:
        raise FormatError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in _strings(metadata["tokenizer.ggml.merges"])]
    if any(len(m) != 2 for m in merges):
        raise FormatError("GGUF tokenizer.ggml.merges has an entry that is not two tokens")
    tokenizer = _bpe(vocab, merges, fuse_unk=False, byte_fallback=False)
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spelled


def _sentencepiece(
    tokens: list[str], metadata: Mapping[str, Any], arch: str
) -> tuple[Tokenizer, list[str]]:
    """SentencePiece BPE with byte fallback; merges derived from the vocabulary."""
    gemma = arch in _RANK_BY_POSITION
    if gemma:
        # Gemma stores whitespace-run tokens as real spaces but looks them up as "▁▁..."
        vocab_tokens = [SPM_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    else:
        vocab_tokens = tokens
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    if gemma:
        merges = _merges_by_position(vocab_tokens, vocab)
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise FormatError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
        merges = _merges_by_score(vocab_tokens, vocab, np.asarray(scores, dtype=np.float64))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = vocab_tokens[_token_index(unk_id, tokens, "unknown")] if unk_id is not None else "<unk>"
    tokenizer = _bpe(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tokenizer.normalizer = normalizers.Replace(" ", SPM_SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":
        # Phi-3 prepends the space in a normalizer (so "  hi" keeps both spaces), not Metaspace
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)]
        )
    else:
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPM_SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, vocab_tokens


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> Tokenizer:
    """The BPE model, with the library's complaints (a merge of unknown tokens) as FormatError."""
    try:
        return Tokenizer(BPE(vocab=vocab, merges=merges, **options))
    except Exception as exc:  # tokenizers raises plain Exception
        raise FormatError(f"GGUF tokenizer vocabulary is inconsistent: {exc}") from exc


def _token_index(value: Any, tokens: Sequence[str], key: str) -> int:
    """A `tokenizer.ggml.<key>_token_id` checked against the vocabulary."""
    index = int(value)
    if not 0 <= index < len(tokens):
        raise FormatError(
            f"GGUF tokenizer.ggml.{key}_token_id {index} is outside the vocabulary "
            f"of {len(tokens)} tokens"
        )
    return index


def _merges_by_position(tokens: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, ranked by file position.

    Same list as transformers' `generate_merges(vocab, {t: -position})`: its sort key is
    (score, len(left), len(right)) descending, and since every token has its own position the
    order is simply token by token, longest left part first — so we emit it in that order.
    """
    unique = [t for i, t in enumerate(tokens) if len(t) > 1 and vocab[t] == i]
    known = frozenset(vocab)  # set lookups are measurably faster than dict ones here
    return [
        (t[:k], t[k:])
        for t in unique
        for k in range(len(t) - 1, 0, -1)
        if t[:k] in known and t[k:] in known
    ]


def _merges_by_score(
    tokens: Sequence[str], vocab: Mapping[str, int], scores: np.ndarray
) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, ranked by the token's score.

    Matches transformers' `generate_merges(vocab, dict(zip(tokens, scores)))`, ties included:
    candidates in vocabulary order (each token's own splits ordered by the ids of its parts),
    then a stable sort by (score, len(left), len(right)) descending.
    """
    score_of = dict(zip(tokens, scores.tolist(), strict=False))
    candidates: list[tuple[str, str, float]] = []
    for t in score_of:  # first-occurrence order, last-occurrence score, as a dict gives
        if len(t) < 2:
            continue
        local = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        s = score_of[t]
        candidates.extend((left, right, s) for left, right in local)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


# ---------------------------------------------------------------------------------------------
# special tokens


def _add_marked_tokens(
    tokenizer: Tokenizer,
    tokens: list[str],
    vocab_tokens: list[str],
    types: np.ndarray,
    metadata: Mapping[str, Any],
    *,
    byte_level: bool,
    arch: str,
) -> None:
    """Register CONTROL tokens (and bos/eos/unk/pad) as special, USER_DEFINED ones as added.

    A CONTROL token spelled outside the byte alphabet in a byte-level vocabulary is a llama.cpp
    mislabel (transformers skips it too): adding it would create a new id past the model's
    vocabulary.
    """
    alphabet = frozenset(byte_alphabet().values()) if byte_level else None
    special: dict[str, None] = {}
    for i in np.flatnonzero(types == TOKEN_TYPE_CONTROL).tolist():
        t = tokens[i]
        if alphabet is None or alphabet.issuperset(t):
            special[t] = None
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(vocab_tokens):
            special.setdefault(vocab_tokens[int(token_id)], None)
    if arch in _RANK_BY_POSITION and "<mask>" in vocab_tokens[:16]:
        special.setdefault("<mask>", None)  # Gemma's mask token, special in its tokenizer
    if special:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special]
        )
    plain = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i in np.flatnonzero(types == TOKEN_TYPE_USER_DEFINED).tolist()
        if tokenizer.token_to_id(tokens[i]) is not None and tokens[i] not in special
    ]
    if plain:
        tokenizer.add_tokens(plain)


def _post_processor(
    tokens: list[str], metadata: Mapping[str, Any], kind: str
) -> processors.TemplateProcessing | None:
    """BOS/EOS around each sequence as `tokenizer.ggml.add_bos_token`/`add_eos_token` say.

    SentencePiece vocabularies add BOS unless the file says otherwise (llama.cpp's default).
    """
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    bos = eos = None
    if add_bos and bos_id is not None:
        index = _token_index(bos_id, tokens, "bos")
        bos = (tokens[index], index)
    if add_eos and eos_id is not None:
        index = _token_index(eos_id, tokens, "eos")
        eos = (tokens[index], index)
    return template_processing(bos, eos)


def template_processing(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing | None:
    """The post-processor transformers builds for add_bos/add_eos (None when neither)."""
    if bos is None and eos is None:
        return None
    head = f"{bos[0]}:0 " if bos else ""
    tail = f" {eos[0]}:0" if eos else ""
    single = f"{head}$A:0{tail}"
    pair = (
        f"{single}{(' ' + bos[0] + ':1') if bos else ''} $B:1{(' ' + eos[0] + ':1') if eos else ''}"
    )
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t is not None]
    )


# ---------------------------------------------------------------------------------------------
# metadata values


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of byte-level vocabularies)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _strings(values: Iterable[Any]) -> list[str]:
    """A GGUF string array as `str`s, whatever container the reader used."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    out = list(values)
    if out and not isinstance(out[0], str):
        out = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in out]
    return out


def _ints(values: Any, n: int) -> np.ndarray:
    """A GGUF integer array as numpy (all NORMAL when the file has none)."""
    if values is None:
        return np.ones(n, dtype=np.int32)
    arr = np.asarray(values, dtype=np.int64)
    if arr.shape != (n,):
        raise FormatError(f"GGUF tokenizer.ggml.token_type has {arr.size} entries for {n} tokens")
    return arr
