"""The engine's tokenizer: text <-> ids, special tokens, and streaming detokenization.

One class over whatever the model ships: a `tokenizer.json` (read by the `tokenizers`
library) or, for a GGUF-only model, the vocabulary embedded in the GGUF metadata (rebuilt by
`gguf_tokenizer`). The special-token facts the engine needs (BOS, the set of ids that end a
generation) come from `tokenizer_config.json`, `generation_config.json`, `config.json` and
the GGUF metadata, merged here once so the engine and the HTTP layer ask a single object.

Prompts produced by a chat template already contain the template's own BOS text, so callers
encode them with `add_special_tokens=False` (as transformers' `apply_chat_template` does);
raw completion prompts use the default `True`, which adds BOS where the model wants it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from modeldeploy.server.engine.gguf_tokenizer import (
    SPM_SPACE,
    byte_alphabet,
    template_processing,
    tokenizer_from_gguf,
)
from modeldeploy.server.errors import FormatError
from tokenizers import Tokenizer as HFTokenizer

#: Texts of tokens that end a turn, as llama.cpp's vocabulary loader recognises them; in a GGUF
#: (which carries no generation_config.json) they complete the set of end-of-generation ids.
END_OF_GENERATION_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",  # noqa: RUF001 (DeepSeek spells it with fullwidth bars)
    "<end_of_utterance>",
    "<eos>",
    "</s>",
)

REPLACEMENT_CHAR = "\ufffd"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback tokens


class Tokenizer:
    """Encode/decode with the model's own tokenizer; see `from_files`."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        primary_eos_id: int | None,
        source: str,
    ) -> None:
        self._tok = backend
        self.source = source
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.eos_token_id = primary_eos_id
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = backend.id_to_token(primary_eos_id) if primary_eos_id is not None else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_ids = frozenset(added)
        decoder = backend.decoder.__getstate__() if backend.decoder is not None else b""
        self._byte_level = b'"ByteLevel"' in decoder
        self._byte_values = {c: b for b, c in byte_alphabet().items()}

    @classmethod
    def from_files(
        cls, model_dir: Path | None, gguf_metadata: Mapping[str, Any] | None
    ) -> Tokenizer:
        """The tokenizer of a model: `model_dir/tokenizer.json` if present, else the GGUF's.

        `model_dir` is the slug or model directory (may be None for a lone GGUF); its
        `tokenizer_config.json`, `generation_config.json` and `config.json` refine BOS/EOS.
        Raises FormatError when neither source has a tokenizer.
        """
        model_dir = Path(model_dir) if model_dir is not None else None
        tokenizer_json = model_dir / "tokenizer.json" if model_dir is not None else None
        tok_config = _read_json(model_dir, "tokenizer_config.json")
        gen_config = _read_json(model_dir, "generation_config.json")
        config = _read_json(model_dir, "config.json")
        meta = gguf_metadata or {}

        if tokenizer_json is not None and tokenizer_json.is_file():
            try:
                backend = HFTokenizer.from_file(str(tokenizer_json))
            except Exception as exc:  # the library raises plain Exception on bad JSON
                raise FormatError(f"{tokenizer_json}: not a valid tokenizer.json ({exc})") from exc
            source = str(tokenizer_json)
            _apply_add_bos_eos(backend, tok_config)
        elif "tokenizer.ggml.tokens" in meta:
            backend = tokenizer_from_gguf(meta)
            source = "GGUF metadata"
        else:
            where = f"{model_dir} has no tokenizer.json" if model_dir else "no model directory"
            raise FormatError(f"no tokenizer: {where} and no GGUF metadata with a vocabulary")

        # tokenizer_config.json is authoritative when it names the token, even as null (Qwen has
        # no BOS there although config.json gives an id): that is what templates see in HF.
        if "bos_token" in tok_config:
            bos_id = _token_id(backend, tok_config.get("bos_token"))
        else:
            bos_id = _first_int(meta.get("tokenizer.ggml.bos_token_id"), config.get("bos_token_id"))
        eos_primary = _token_id(backend, tok_config.get("eos_token"))
        if eos_primary is None:
            eos_primary = _first_int(
                meta.get("tokenizer.ggml.eos_token_id"),
                gen_config.get("eos_token_id"),
                config.get("eos_token_id"),
            )
        eos_ids = {eos_primary} if eos_primary is not None else set()
        for value in (
            gen_config.get("eos_token_id"),
            config.get("eos_token_id"),
            meta.get("tokenizer.ggml.eos_token_id"),
            meta.get("tokenizer.ggml.eot_token_id"),
            meta.get("tokenizer.ggml.eom_token_id"),
        ):
            eos_ids.update(_ints(value))
        if source == "GGUF metadata":
            for text in END_OF_GENERATION_TEXTS:
                token_id = backend.token_to_id(text)
                if token_id is not None:
                    eos_ids.add(token_id)
        vocab = backend.get_vocab_size(with_added_tokens=True)
        eos_ids = {i for i in eos_ids if 0 <= i < vocab}
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            primary_eos_id=eos_primary,
            source=source,
        )

    # -- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the model asks.

        Lone surrogates (JSON allows "\\ud800") are not text the library accepts; they are
        encoded as U+FFFD instead of failing the request.
        """
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            clean = _LONE_SURROGATE.sub(REPLACEMENT_CHAR, text)
            return self._tok.encode(clean, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens dropped unless asked for)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token such as BOS or `<|im_end|>`."""
        return token_id in self._special_ids

    def token_to_id(self, text: str) -> int | None:
        """The id of a token spelled exactly `text` (None if there is none)."""
        return self._tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of `token_id` (byte-level or `▁` form, not decoded text)."""
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (OpenAI logprobs' `bytes`), even when the token
        is only part of a UTF-8 character and so has no text of its own."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            values = self._byte_values
            if all(c in values for c in piece):
                return bytes(values[c] for c in piece)
            return piece.encode("utf-8")
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(SPM_SPACE, " ").encode("utf-8")

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for one generated stream; see `IncrementalDecoder`."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch encoding or inspection)."""
        return self._tok


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that are always whole characters.

    A character may span tokens (byte-fallback `<0xF0>` pieces, byte-level fragments of an
    emoji), and a token's text can depend on its neighbours (SentencePiece's leading space).
    So we decode a small window: the tokens since the last emitted text plus a few before it
    for context, compare with the same window without the new tokens, and emit the
    difference — unless it ends in U+FFFD, which means a character is still incomplete; then
    we wait for more tokens. `flush()` emits whatever is left at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new complete text (maybe "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = decode(self._ids[self._prefix_offset :], self._skip)
        if not final and (len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR)):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


# ---------------------------------------------------------------------------------------------
# config files


def _read_json(model_dir: Path | None, name: str) -> dict:
    """A JSON object file from the model directory, {} when absent; FormatError when corrupt."""
    if model_dir is None:
        return {}
    path = model_dir / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: also the int-digit limit
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(backend: HFTokenizer, value: Any) -> int | None:
    text = _token_text(value)
    return backend.token_to_id(text) if text is not None else None


def _ints(value: Any) -> list[int]:
    """An id or list of ids from a config file or GGUF key ([] when absent)."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    try:
        return [int(value)]  # numpy scalars from a GGUF reader
    except (TypeError, ValueError):
        return []


def _first_int(*values: Any) -> int | None:
    for value in values:
        ids = _ints(value)
        if ids:
            return ids[0]
    return None


def _apply_add_bos_eos(backend: HFTokenizer, tok_config: Mapping[str, Any]) -> None:
    """Honour explicit add_bos_token/add_eos_token in tokenizer_config.json, as transformers does.

    tokenizer.json's own post-processor decides otherwise; transformers rebuilds it only when
    the config states either flag, and so do we.
    """
    if "add_bos_token" not in tok_config and "add_eos_token" not in tok_config:
        return
    bos = _token_text(tok_config.get("bos_token"))
    eos = _token_text(tok_config.get("eos_token"))
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    add_bos = bool(tok_config.get("add_bos_token")) and bos_id is not None
    add_eos = bool(tok_config.get("add_eos_token")) and eos_id is not None
    backend.post_processor = template_processing(
        (bos, bos_id) if add_bos else None, (eos, eos_id) if add_eos else None
    )
