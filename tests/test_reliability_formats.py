"""Hostile model files, generated from the formats' own grammar, on a fixed budget.

tests/test_formats_fuzz.py flips bytes of a valid file; most flips land in tensor names or
string bodies and never reach a count, a type tag or a JSON number. Here hypothesis *builds*
GGUF and SafeTensors headers field by field, so every length, count, value type, dimension,
tensor type, offset and JSON value is chosen, and may lie (a count of 2**64-1, a string that
claims to be longer than the file, a 5000-digit integer where a shape goes). For every file:

- only `FormatError` (our one-line user error) may escape `open_model_files` — which parses
  the header *and* derives the model config from it, so odd metadata types are covered too;
- no hang: each example has a deadline (DEADLINE_MS), and the whole test a pytest timeout;
- bounded allocation: the tracemalloc peak of one open stays below ALLOC_BOUND, although the
  headers claim gigabytes. Python and numpy allocations are traced; the file itself is mmapped
  and not counted, which is the point (a lying header must not make us *copy* anything big).

Budget: MODELDEPLOY_FUZZ_EXAMPLES examples per test (default 120 for `make test`; `make
soak` runs 3000).
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modeldeploy.server.errors import FormatError
from modeldeploy.server.formats import open_model_files

EXAMPLES = int(os.environ.get("MODELDEPLOY_FUZZ_EXAMPLES", "120"))
#: Per-example wall-clock limit. Generous because the CI box is shared and loaded; a parser
#: that loops over a lying count of 2**64 would take years, not seconds.
DEADLINE_MS = 3000
#: Peak traced allocation while opening one generated file (all are < 64 KiB on disk).
ALLOC_BOUND = 8 * 1024 * 1024

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE_MS,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)

pytestmark = pytest.mark.timeout(300)


def open_within_bounds(path: Path) -> str:
    """Open the model; return "ok" or "refused". Anything but FormatError fails the test."""
    tracemalloc.start()
    try:
        try:
            files = open_model_files(path, strict=False)
        except FormatError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            outcome = "refused"
        else:
            if files.gguf is not None:
                for t in files.gguf.tensors:
                    assert t.offset + t.n_bytes <= files.gguf.file_size
            outcome = "ok"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_BOUND, f"opening {path.name} allocated {peak} bytes at peak"
    PEAKS.append(peak)
    return outcome


#: Every measured peak, for the figure printed at the end of the module.
PEAKS: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _report_peaks():
    yield
    if PEAKS:
        print(f"\nformats fuzz: {len(PEAKS)} files opened, tracemalloc peak max "
              f"{max(PEAKS) / 2**20:.2f} MiB (bound {ALLOC_BOUND / 2**20:.0f} MiB)")  # fmt: skip


# ---------------------------------------------------------------------------------------
# GGUF, written field by field

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip
_RANGES = {
    U8: (0, 2**8 - 1), I8: (-(2**7), 2**7 - 1), U16: (0, 2**16 - 1), I16: (-(2**15), 2**15 - 1),
    U32: (0, 2**32 - 1), I32: (-(2**31), 2**31 - 1), U64: (0, 2**64 - 1),
    I64: (-(2**63), 2**63 - 1),
}  # fmt: skip

#: Keys whose values the config derivation reads: wrong types there must be FormatError too.
KEYS = [
    "general.architecture", "general.alignment", "general.name", "general.file_type",
    "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.attention.key_length",
    "qwen2.block_count", "gemma3.attention.sliding_window", "gemma3.block_count",
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.bos_token_id", "tokenizer.chat_template", "tokenizer.ggml.token_type",
]  # fmt: skip
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "mamba", ""]
TENSOR_NAMES = ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "output.weight"]

#: A count or length: honest, small, or a lie up to u64 max.
lengths = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1), st.just(2**64 - 1))


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


@st.composite
def gguf_strings(draw: st.DrawFn, text: st.SearchStrategy[str] | None = None) -> bytes:
    body = draw(text if text is not None else st.text(max_size=12)).encode("utf-8", "replace")
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=12))  # invalid UTF-8
    declared = draw(st.one_of(st.just(len(body)), lengths))
    return _u64(declared) + body


@st.composite
def gguf_values(draw: st.DrawFn, vtype: int, depth: int = 0) -> bytes:
    if vtype in _RANGES:
        lo, hi = _RANGES[vtype]
        return struct.pack(_SCALAR[vtype], draw(st.integers(lo, hi)))
    if vtype == F32:
        return struct.pack("<f", draw(st.floats(width=32)))
    if vtype == F64:
        return struct.pack("<d", draw(st.floats()))
    if vtype == BOOL:
        return bytes([draw(st.integers(0, 255))])  # not only 0/1
    if vtype == STRING:
        return draw(gguf_strings(st.sampled_from(ARCHS) | st.text(max_size=8)))
    if vtype == ARRAY:
        item = draw(st.integers(0, 14)) if depth < 3 else U8
        n = draw(st.integers(0, 6))
        declared = draw(st.one_of(st.just(n), lengths))
        items = b"".join(draw(gguf_values(item, depth + 1)) for _ in range(n)) if item < 13 else b""
        return _u32(item) + _u64(declared) + items
    return draw(st.binary(max_size=8))  # an unknown type tag's "value"


@st.composite
def gguf_files(draw: st.DrawFn) -> bytes:
    kvs = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(gguf_strings(st.sampled_from(KEYS)))
        vtype = draw(st.one_of(st.integers(0, 12), st.integers(13, 2**32 - 1)))
        kvs.append(key + _u32(vtype) + draw(gguf_values(vtype)))
    tensors = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(gguf_strings(st.sampled_from(TENSOR_NAMES)))
        n_dims = draw(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)))
        dims = [draw(st.one_of(st.integers(0, 64), lengths)) for _ in range(min(n_dims, 5))]
        ttype = draw(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)))
        offset = draw(st.one_of(st.sampled_from([0, 32, 64]), lengths))
        tensors.append(name + _u32(n_dims) + b"".join(map(_u64, dims)) + _u32(ttype) + _u64(offset))
    version = draw(st.sampled_from([2, 3, 3, 3, 1, 4, 2**24]))
    n_tensors = draw(st.one_of(st.just(len(tensors)), lengths))
    n_kv = draw(st.one_of(st.just(len(kvs)), lengths))
    header = b"GGUF" + _u32(version) + _u64(n_tensors) + _u64(n_kv) + b"".join(kvs + tensors)
    pad = -len(header) % 32
    return header + b"\0" * pad + draw(st.binary(max_size=256))


@FUZZ
@given(raw=gguf_files())
def test_generated_gguf_headers_are_read_or_refused_within_bounds(tmp_path, raw):
    path = tmp_path / "gen.gguf"
    path.write_bytes(raw)
    open_within_bounds(path)


def test_lying_gguf_counts_are_refused_cheaply(tmp_path):
    """The extremes hypothesis may or may not hit in a run: each refused, none allocates."""
    cases = {
        "tensor count": _u64(2**64 - 1) + _u64(0),
        "kv count": _u64(0) + _u64(2**64 - 1),
        "string length": _u64(0) + _u64(1) + _u64(2**63) + b"k",
        "array length": _u64(0) + _u64(1) + _u64(1) + b"k" + _u32(ARRAY) + _u32(U64)
        + _u64(2**61),
        "nested arrays": _u64(0) + _u64(1) + _u64(1) + b"k" + _u32(ARRAY) + _u32(ARRAY)
        + _u64(2**40),
        "string array": _u64(0) + _u64(1) + _u64(1) + b"k" + _u32(ARRAY) + _u32(STRING)
        + _u64(2**60),
    }  # fmt: skip
    for what, body in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.gguf"
        path.write_bytes(b"GGUF" + _u32(3) + body + b"\0" * 64)
        assert open_within_bounds(path) == "refused", what


# ---------------------------------------------------------------------------------------
# SafeTensors, header written as JSON text token by token

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F4", "f32", "", "Q4_0"]

#: JSON numbers as text: what json.dumps can write, and what only a hostile writer would.
json_numbers = st.one_of(
    st.integers(-3, 64).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1e400", "-0", "1.5", "NaN", "Infinity", "-Infinity", "1E2"]),
    st.sampled_from([20, 400, 4301, 6000]).map(lambda n: "9" * n),  # 4300: int-from-str limit
)


def _json_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


@st.composite
def json_values(draw: st.DrawFn) -> str:
    return draw(
        st.one_of(
            json_numbers,
            st.sampled_from(["null", "true", "false", '"x"', "{}", "[]"]),
            st.integers(0, 3).map(lambda n: _json_list(["0"] * n)),
            st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),  # deep nesting
        )
    )


@st.composite
def tensor_entries(draw: st.DrawFn) -> str:
    dtype = json.dumps(draw(st.sampled_from(DTYPES)))
    shape = draw(st.one_of(st.lists(json_numbers, max_size=4).map(_json_list), json_values()))
    offsets = draw(st.one_of(st.lists(json_numbers, max_size=3).map(_json_list), json_values()))
    fields = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    keys = draw(st.permutations(list(fields)))
    kept = keys[: draw(st.integers(1, 3))] if draw(st.integers(0, 5)) == 0 else keys
    return "{" + ", ".join(f'"{k}": {fields[k]}' for k in kept) + "}"


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    entries = [
        f"{json.dumps(draw(st.sampled_from(TENSOR_NAMES)))}: {draw(tensor_entries())}"
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.booleans()):
        meta = draw(st.one_of(json_values(), st.just('{"format": "pt"}')))
        entries.insert(draw(st.integers(0, len(entries))), f'"__metadata__": {meta}')
    header = ("{" + ", ".join(entries) + "}").encode()
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.binary(max_size=64))  # not JSON at all
    declared = draw(st.one_of(st.just(len(header)), lengths))
    return _u64(declared) + header + draw(st.binary(max_size=256))


@FUZZ
@given(raw=safetensors_files())
def test_generated_safetensors_headers_are_read_or_refused_within_bounds(tmp_path, raw):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
                    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    )  # fmt: skip
    path = model / "model.safetensors"
    path.write_bytes(raw)
    open_within_bounds(path)


def test_a_5000_digit_integer_in_a_safetensors_header_is_a_format_error(tmp_path):
    """Found by the generator above: Python refuses to parse ints over 4300 digits with a bare
    ValueError (not a JSONDecodeError), which escaped as an internal error."""
    header = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(_u64(len(header)) + header + b"\0" * 4)
    assert open_within_bounds(path) == "refused"


@FUZZ
@given(
    weight_map=st.one_of(
        json_values(),
        st.lists(
            st.tuples(
                st.sampled_from(TENSOR_NAMES),
                st.one_of(
                    json_values(),
                    st.sampled_from(
                        [
                            '"model-1.safetensors"',
                            '"../x.safetensors"',
                            '"/etc/passwd"',
                            '"a\\\\b"',
                            '""',
                            '"."',
                            '"sub/../../x"',
                        ]
                    ),
                ),
            ),
            max_size=4,
        ).map(lambda kv: "{" + ", ".join(f'"{k}": {v}' for k, v in kv) + "}"),
    )
)
def test_generated_safetensors_indexes_are_read_or_refused_within_bounds(tmp_path, weight_map):
    model = tmp_path / "idx"
    model.mkdir(exist_ok=True)
    index = model / "model.safetensors.index.json"
    index.write_text('{"metadata": {"total_size": 4}, "weight_map": ' + weight_map + "}")
    assert open_within_bounds(index) == "refused"  # no shard exists, so never "ok"


# ---------------------------------------------------------------------------------------
# The JSON files next to the weights go through the same kind of parser


HOSTILE_JSON = {
    "5000-digit integer": '{"eos_token_id": ' + "9" * 5000 + "}",
    "deep nesting": '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "not an object": "[1, 2]",
    "invalid UTF-8": '{"a": "\xff"}',
}


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("content", sorted(HOSTILE_JSON))
def test_hostile_sibling_json_is_a_user_error(tiny_models, tmp_path, name, content):
    from fixtures.tiny_models import copy_model
    from modeldeploy.server.engine.tokenizer import Tokenizer
    from modeldeploy.server.errors import UserInputError

    model = copy_model(tiny_models.hf("qwen2"), tmp_path / "m")
    text = HOSTILE_JSON[content]
    (model / name).write_bytes(
        text.encode("latin-1") if content == "invalid UTF-8" else text.encode()
    )
    with pytest.raises(UserInputError) as info:
        open_model_files(model, strict=False)
        Tokenizer.from_files(model, None)
    assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["5000-digit integer", "deep nesting"])
def test_hostile_chat_template_json_file_is_a_template_error(tmp_path, content):
    from modeldeploy.server.engine.chat_template import ChatTemplate
    from modeldeploy.server.engine.errors import ChatTemplateError

    path = tmp_path / "template.json"
    path.write_text(HOSTILE_JSON[content].replace('"eos_token_id"', '"chat_template"'))
    with pytest.raises(ChatTemplateError, match=r"template\.json"):
        ChatTemplate.load(None, None, path)
