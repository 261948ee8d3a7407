"""Tokenizer: GGUF vocabularies rebuilt as `tokenizers` objects, special tokens, streaming decode.

Oracles: the tiny models' `tokenizer.json` (each tiny GGUF embeds that same vocabulary, written
as llama.cpp's converter writes it), transformers' own GGUF converter for SentencePiece
vocabularies, and the `sentencepiece` library itself.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from fixtures.tiny_models import ARCHS, CORPUS, SPECS
from modeldeploy.server.engine.gguf_tokenizer import tokenizer_from_gguf
from modeldeploy.server.engine.tokenizer import IncrementalDecoder, Tokenizer
from modeldeploy.server.errors import FormatError, UserInputError
from modeldeploy.server.formats.gguf_file import GGUFFile
from tokenizers import Tokenizer as HFTokenizer

#: Beyond the training corpus: unseen words, digits, code, CJK, emoji (multi-byte, ZWJ),
#: whitespace runs and special-token text inside prose.
EXTRA_TEXTS = [
    "zebra quokka xylophone 123456789 0.001",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "def f(x):\n\treturn {'k': [x ** 2 for x in range(3)]}  # ok",
    "Привет мир! Ελληνικά. עברית. العربية. हिन्दी. 한국어. 日本語のテキスト",
    "emoji: 🙂🚀👩‍👩‍👧‍👦🇫🇷 and ✓",
    "it's we're they've I'm you'll he'd DON'T",
    "",
    " ",
]

SPECIAL_TEXT = {
    "llama": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "qwen2": "<|im_start|>user\nHi<|im_end|>\n",
    "qwen3": "<|im_start|>assistant\n<think>hmm</think>Hi<|im_end|>",
    "gemma3": "<start_of_turn>user\nHi<end_of_turn>\n",
}


def _gguf_metadata(path: Path) -> dict:
    with GGUFFile.open(path) as gguf:
        return dict(gguf.metadata)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_vocabulary_encodes_like_the_tokenizer_json_it_came_from(tiny_models, arch):
    hf_dir = tiny_models.hf(arch)
    reference = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ours = tokenizer_from_gguf(_gguf_metadata(tiny_models.gguf(arch)))
    for text in [*CORPUS, *EXTRA_TEXTS, SPECIAL_TEXT[arch]]:
        for special in (True, False):
            expected = reference.encode(text, add_special_tokens=special).ids
            assert ours.encode(text, add_special_tokens=special).ids == expected, (text, special)
        ids = reference.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(
            ids, skip_special_tokens=False
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_from_hf_dir_and_from_gguf_agree_on_special_tokens(tiny_models, arch):
    spec = SPECS[arch]
    from_dir = Tokenizer.from_files(tiny_models.hf(arch), None)
    meta = _gguf_metadata(tiny_models.gguf(arch))
    from_gguf = Tokenizer.from_files(None, meta)
    assert from_dir.bos_token == spec.bos
    # a GGUF always names a BOS (Qwen's is <|endoftext|>), whether or not it is added
    assert from_gguf.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    for tok in (from_dir, from_gguf):
        assert tok.eos_token == spec.eos
        generation_eos = {tok.token_to_id(t) for t in spec.generation_eos}
        assert generation_eos <= tok.eos_token_ids
        for text in spec.special_tokens:
            assert tok.is_special(tok.token_to_id(text))
        assert not tok.is_special(tok.encode("Hello", add_special_tokens=False)[0])
        ids = tok.encode("Hello world")
        assert (ids[0] == tok.bos_token_id) is spec.add_bos
        assert tok.encode("Hello world", add_special_tokens=False) == ids[int(spec.add_bos) :]
        # special tokens vanish from decoded text unless asked for
        chat = tok.encode(SPECIAL_TEXT[arch], add_special_tokens=False)
        assert spec.eos not in tok.decode(chat)
        assert SPECIAL_TEXT[arch] == tok.decode(chat, skip_special_tokens=False)
    assert from_dir.vocab_size == HFTokenizer.from_file(
        str(tiny_models.hf(arch) / "tokenizer.json")
    ).get_vocab_size(with_added_tokens=True)


def test_user_defined_tokens_stay_whole_but_are_not_special(tiny_models):
    tok = Tokenizer.from_files(None, _gguf_metadata(tiny_models.gguf("qwen3")))
    think = tok.token_to_id("<think>")
    assert tok.encode("a<think>b", add_special_tokens=False).count(think) == 1
    assert not tok.is_special(think)
    assert tok.decode([think]) == "<think>"


def test_tokenizer_config_add_bos_token_overrides_tokenizer_json(tiny_models, tmp_path):
    model = shutil.copytree(tiny_models.hf("llama"), tmp_path / "m")
    bos = Tokenizer.from_files(model, None).bos_token_id
    assert Tokenizer.from_files(model, None).encode("Hi")[0] == bos
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert bos not in Tokenizer.from_files(model, None).encode("Hi")


def test_lone_surrogates_encode_as_replacement_characters(tiny_models):
    tok = Tokenizer.from_files(tiny_models.hf("qwen2"), None)
    assert tok.encode(json.loads('"a\\ud800b"')) == tok.encode("a\ufffdb")


def test_gguf_end_of_turn_tokens_join_the_eos_set(tiny_models):
    meta = _gguf_metadata(tiny_models.gguf("qwen2"))
    tok = Tokenizer.from_files(None, meta)
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}


def test_missing_or_bad_tokenizers_are_user_errors(tmp_path, tiny_models):
    with pytest.raises(FormatError, match="no tokenizer"):
        Tokenizer.from_files(tmp_path, None)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"tokenizer\.json"):
        Tokenizer.from_files(tmp_path, None)
    meta = _gguf_metadata(tiny_models.gguf("qwen2"))
    with pytest.raises(FormatError, match="'rwkv' is not supported"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(FormatError, match="merges"):
        tokenizer_from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(FormatError, match="inconsistent"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["nosuch token"]})
    with pytest.raises(FormatError, match="not two tokens"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["single"]})
    with pytest.raises(FormatError, match="bos_token_id 99999 is outside"):
        tokenizer_from_gguf(
            {**meta, "tokenizer.ggml.bos_token_id": 99999, "tokenizer.ggml.add_bos_token": True}
        )
    assert issubclass(FormatError, UserInputError)


# ---------------------------------------------------------------------------------------------
# SentencePiece ("llama") vocabularies


def _train_sentencepiece():
    """A tiny SentencePiece BPE with byte fallback, and its GGUF metadata as convert writes it."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buf,
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        character_coverage=0.98,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [
        2
        if sp.is_unknown(i)
        else 3
        if sp.is_control(i)
        else 6
        if sp.is_byte(i)
        else 4
        if tokens[i] in ("<start_of_turn>", "<end_of_turn>")
        else 1
        for i in range(n)
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    return sp, meta


@pytest.fixture(scope="module")
def sentencepiece_vocab():
    return _train_sentencepiece()


def _transformers_converter(arch: str, meta: dict):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    backend, _ = convert_gguf_tokenizer(
        arch,
        {
            "tokenizer_type": "llama",
            "tokens": meta["tokenizer.ggml.tokens"],
            "scores": meta["tokenizer.ggml.scores"],
            "token_type": meta["tokenizer.ggml.token_type"],
            "unk_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
    return backend


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_vocabulary_matches_transformers_converter(sentencepiece_vocab, arch):
    _, meta = sentencepiece_vocab
    meta = {**meta, "general.architecture": arch}
    ours = tokenizer_from_gguf(meta)
    theirs = _transformers_converter(arch, meta)
    assert (
        json.loads(ours.to_str())["model"]["merges"]
        == json.loads(theirs.to_str())["model"]["merges"]
    )
    texts = [*CORPUS, *EXTRA_TEXTS, "<start_of_turn>user\nhi<end_of_turn>"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == theirs.decode(ids)
    # BOS is added because a SentencePiece GGUF that does not say otherwise wants it
    assert ours.encode("hi").ids[0] == 1
    assert (
        tokenizer_from_gguf({**meta, "tokenizer.ggml.add_bos_token": False}).encode("hi").ids
        != ours.encode("hi").ids
    )


def test_sentencepiece_vocabulary_matches_sentencepiece_itself(sentencepiece_vocab):
    """llama.cpp's SPM tokenizer reproduces sentencepiece; so must we (texts that do not start
    with a space, where transformers' Metaspace and sentencepiece's dummy prefix differ)."""
    sp, meta = sentencepiece_vocab
    ours = tokenizer_from_gguf({**meta, "general.architecture": "llama"})
    for text in [*CORPUS, *EXTRA_TEXTS]:
        if not text or text[0].isspace():
            continue
        assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        # byte fallback: characters outside the vocabulary round-trip through <0xNN> tokens
        assert ours.decode(ours.encode(text).ids) == text


def test_byte_fallback_pieces_are_used_for_unknown_characters(sentencepiece_vocab):
    _, meta = sentencepiece_vocab
    ours = tokenizer_from_gguf({**meta, "general.architecture": "llama"})
    ids = ours.encode("Ж", add_special_tokens=False).ids  # not in the training corpus
    pieces = [ours.id_to_token(i) for i in ids]
    assert pieces[-2:] == ["<0xD0>", "<0x96>"]


# ---------------------------------------------------------------------------------------------
# incremental decoding


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_incremental_decoder_emits_whole_characters_summing_to_the_full_text(tiny_models, arch):
    tok = Tokenizer.from_files(tiny_models.hf(arch), None)
    held_back = 0
    for text in [*CORPUS, *EXTRA_TEXTS]:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok.incremental_decoder(), ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
        held_back += sum(1 for d in deltas[:-1] if d == "")
    assert held_back > 0  # multi-byte characters split over tokens were held back


def test_incremental_decoder_handles_byte_fallback_and_incomplete_tails(sentencepiece_vocab):
    _, meta = sentencepiece_vocab
    tok = Tokenizer(
        tokenizer_from_gguf({**meta, "general.architecture": "llama"}),
        bos_token_id=1,
        eos_token_ids={2},
        primary_eos_id=2,
        source="test",
    )
    text = "Hi Ж🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok.incremental_decoder(), ids)
    assert "".join(deltas) == text
    assert "Ж" in deltas and "🙂" in deltas  # each emitted whole, once its last byte arrived
    # a stream that stops inside a character: held back, then flushed as one U+FFFD
    emoji = tok.encode("🙂", add_special_tokens=False)
    decoder = tok.incremental_decoder()
    assert [decoder.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert decoder.flush().endswith("\ufffd")
    assert decoder.flush() == ""


def test_incremental_decoder_skips_special_tokens_unless_asked(tiny_models):
    tok = Tokenizer.from_files(tiny_models.hf("qwen2"), None)
    ids = tok.encode("Hi<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(tok.incremental_decoder(), ids)) == "Hi"
    kept = tok.incremental_decoder(skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) == "Hi<|im_end|>"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_encode_like_transformers_autotokenizer(tiny_models, arch):
    from transformers import AutoTokenizer

    gguf = tiny_models.gguf(arch)
    pairs = [
        (
            Tokenizer.from_files(tiny_models.hf(arch), None),
            AutoTokenizer.from_pretrained(str(tiny_models.hf(arch))),
        ),
        (
            Tokenizer.from_files(None, _gguf_metadata(gguf)),
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
        ),
    ]
    for ours, theirs in pairs:
        for text in [*CORPUS[:3], *EXTRA_TEXTS, SPECIAL_TEXT[arch]]:
            for special in (True, False):
                assert ours.encode(text, special) == theirs.encode(text, add_special_tokens=special)
        assert ours.bos_token_id == theirs.bos_token_id
        assert ours.eos_token == theirs.eos_token


def test_token_bytes_reassemble_the_utf8_text(tiny_models, sentencepiece_vocab):
    _, meta = sentencepiece_vocab
    spm = Tokenizer(
        tokenizer_from_gguf({**meta, "general.architecture": "gemma3"}),
        bos_token_id=1,
        eos_token_ids={2},
        primary_eos_id=2,
        source="test",
    )
    byte_level = Tokenizer.from_files(tiny_models.hf("qwen2"), None)
    for tok in (byte_level, spm):
        for text in ["Hi Ж🙂 done", *EXTRA_TEXTS]:
            ids = tok.encode(text, add_special_tokens=False)
            assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    emoji = spm.encode("Ж", add_special_tokens=False)
    assert [spm.token_bytes(i) for i in emoji] == [b"\xd0", b"\x96"]
    assert byte_level.token_bytes(byte_level.token_to_id("<|im_end|>")) == b"<|im_end|>"


def test_every_known_pre_tokenizer_name_builds_a_lossless_tokenizer(tiny_models):
    from modeldeploy.server.engine.gguf_tokenizer import PRE_TOKENIZER_SPLITS

    meta = _gguf_metadata(tiny_models.gguf("qwen2"))
    text = "Hello, World! it's 2024: 日本語 🙂\n\tcode(x) == 42 ¡ÿ"
    splits = {}
    for pre in PRE_TOKENIZER_SPLITS:
        tok = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": pre})
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, pre
        splits[pre] = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("x 2024")]
    # the names select llama.cpp's splits: digits one by one (qwen2), by three (llama3), a run
    # with its leading space (GPT-2)
    assert splits["qwen2"] == ["x", "Ġ", "2", "0", "2", "4"]
    assert splits["llama-bpe"] == ["x", "Ġ", "202", "4"]
    assert splits["gpt-2"] == ["x", "Ġ2024"]


@pytest.mark.parametrize("vocab", ["qwen2", "gemma3", "spm-llama", "spm-gemma3"])
def test_incremental_decoder_agrees_with_decode_for_any_id_sequence(
    tiny_models, sentencepiece_vocab, vocab
):
    """Random ids make invalid UTF-8 too: only a stream's last delta may end in U+FFFD, and
    the deltas add up to the full decode whenever that is valid text; any text streams back
    exactly, character by character."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    if vocab.startswith("spm-"):
        meta = {**sentencepiece_vocab[1], "general.architecture": vocab[4:]}
        tok = Tokenizer(
            tokenizer_from_gguf(meta),
            bos_token_id=1,
            eos_token_ids={2},
            primary_eos_id=2,
            source="test",
        )
    else:
        tok = Tokenizer.from_files(tiny_models.hf(vocab), None)

    def stream(ids: list[int]) -> list[str]:
        decoder = tok.incremental_decoder()
        return [decoder.push(i) for i in ids] + [decoder.flush()]

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    def any_ids(ids):
        deltas = stream(ids)
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])
        full = tok.decode(ids)
        if "\ufffd" not in full:
            assert "".join(deltas) == full

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        st.text(st.characters(exclude_characters="\ufffd", exclude_categories=["Cs"]), max_size=30)
    )
    def any_text(text):
        ids = tok.encode(text, add_special_tokens=False)
        deltas = stream(ids)
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)

    any_ids()
    any_text()
