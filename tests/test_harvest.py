"""The slug-directory harvest: every rule of DESIGN.md's "Slug directory" section."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import DEAD_ENDPOINT, HubServer, seed_cache
from modeldeploy.server import sources
from modeldeploy.server.harvest import (
    RECORD_NAME,
    WEIGHT_SUFFIXES,
    HarvestResult,
    fill_slug_dir,
    harvest,
    read_record,
)
from modeldeploy.server.sources import Resolved, SnapshotDir, parse_source

TYPED = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
]
SIBLINGS = [
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    ".gitattributes",
]
WEIGHTS = [
    "model.safetensors",
    "pytorch_model.bin",
    "model-Q4_0.gguf",
    "model.onnx",
    "model.tflite",
    "tf_model.h5",
    "model.pt",
    "training_args.pth",
    "flax_model.msgpack",
    "UPPER.BIN",
]


def _write(path: Path, data: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    return path


def make_model_dir(root: Path) -> Path:
    """A model directory with typed slots, plain siblings, every kind of weight and a subdir."""
    model = root / "model"
    for name in TYPED + SIBLINGS:
        _write(model / name, f"{name} content")
    for name in WEIGHTS:
        _write(model / name, "weights")
    _write(model / "onnx" / "decoder.onnx", "weights")
    _write(model / "original" / "params.json", "{}")
    return model


def slug_state(slug_dir: Path) -> dict[str, str]:
    """name -> link target of every entry a consumer would see (our bookkeeping excluded)."""
    out = {}
    for entry in sorted(os.scandir(slug_dir), key=lambda e: e.name):
        if entry.name.startswith(".modeldeploy-"):
            continue
        out[entry.name] = os.readlink(entry.path) if entry.is_symlink() else "<regular file>"
    return out


def comparable(result: HarvestResult) -> dict[str, object]:
    data = result.to_dict()
    data.pop("elapsed_s")
    return data


# --------------------------------------------------------------------------------------


def test_siblings_land_as_canonical_symlinks_and_weights_never(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    result = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(result.slug_dir)

    state = slug_state(slug_dir)
    assert sorted(state) == sorted(TYPED + SIBLINGS)
    for name, target in state.items():
        assert target == os.path.realpath(model / name)  # absolute, fully resolved
        assert (slug_dir / name).read_text() == f"{name} content"
    assert result.typed_slots == sorted(TYPED)
    assert result.linked_files == {n: str(model / n) for n in sorted(TYPED + SIBLINGS)}
    assert result.model_path == str(model / "model.safetensors")
    assert not any(name.lower().endswith(WEIGHT_SUFFIXES) for name in os.listdir(slug_dir))
    assert read_record(slug_dir) == result


def test_weight_deny_list_is_defined_once() -> None:
    assert WEIGHT_SUFFIXES is sources.WEIGHT_SUFFIXES
    assert set(WEIGHT_SUFFIXES) == {
        ".safetensors",
        ".bin",
        ".gguf",
        ".onnx",
        ".tflite",
        ".h5",
        ".pt",
        ".pth",
        ".msgpack",
    }


def test_a_typed_slot_is_never_overwritten_by_a_same_named_sibling(tmp_path: Path) -> None:
    first = tmp_path / "gguf-repo"
    second = tmp_path / "base-repo"
    _write(first / "config.json", '{"from": "first"}')
    _write(first / "model.gguf", "GGUF")
    _write(second / "config.json", '{"from": "second, different"}')
    _write(second / "tokenizer.json", '{"from": "second"}')
    _write(second / "extra.json", "{}")
    resolved = Resolved(
        source=parse_source(str(first / "model.gguf")),
        ref=None,
        revision=None,
        quant=None,
        snapshot_dirs=(SnapshotDir(first, first), SnapshotDir(second, second)),
        weight_files=(first / "model.gguf",),
        model_path=first / "model.gguf",
    )
    result = fill_slug_dir(resolved, tmp_path / "slugs")
    slug_dir = Path(result.slug_dir)
    assert (slug_dir / "config.json").read_text() == '{"from": "first"}'
    assert (slug_dir / "tokenizer.json").read_text() == '{"from": "second"}'  # slot was free
    assert (slug_dir / "extra.json").exists()
    # ...and stays so on every later run.
    fill_slug_dir(resolved, tmp_path / "slugs")
    assert (slug_dir / "config.json").read_text() == '{"from": "first"}'


def test_a_derived_file_in_an_empty_typed_slot_survives_reharvest(tmp_path: Path) -> None:
    """The server may write config.json/tokenizer.json from GGUF metadata when the repo has none."""
    gguf = _write(tmp_path / "m" / "model.gguf", "GGUF")
    result = harvest(str(gguf), tmp_path / "slugs")
    derived = _write(Path(result.slug_dir) / "tokenizer.json", '{"derived": true}')
    again = harvest(str(gguf), tmp_path / "slugs")
    assert derived.read_text() == '{"derived": true}' and not derived.is_symlink()
    assert read_record(again.slug_dir) is not None


def test_a_stale_link_from_an_earlier_harvest_is_replaced(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    _write(model / "added_tokens.json", "{}")
    first = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(first.slug_dir)

    # The model changes: a file moves behind a symlink, one disappears, one is new.
    shared = _write(model / "shared" / "special_tokens_map.json", "new map")
    (model / "special_tokens_map.json").unlink()
    (model / "special_tokens_map.json").symlink_to("shared/special_tokens_map.json")
    (model / "added_tokens.json").unlink()
    _write(model / "vocab.txt", "a b c")
    # And someone left a link to a place that no longer means anything.
    os.symlink("/nonexistent/old-blob", slug_dir / "merges.txt")

    second = harvest(str(model), tmp_path / "slugs")
    state = slug_state(slug_dir)
    assert state["special_tokens_map.json"] == str(shared.resolve())
    assert (slug_dir / "special_tokens_map.json").read_text() == "new map"
    assert "added_tokens.json" not in state and "merges.txt" not in state
    assert state["vocab.txt"] == str(model / "vocab.txt")
    assert read_record(slug_dir) == second


def test_a_missing_snapshot_directory_is_a_no_op(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _write(model / "config.json", "{}")
    _write(model / "model.safetensors", "W")
    resolved = Resolved(
        source=parse_source(str(model)),
        ref=None,
        revision=None,
        quant=None,
        snapshot_dirs=(SnapshotDir(tmp_path / "gone", tmp_path), SnapshotDir(model, model)),
        weight_files=(model / "model.safetensors",),
        model_path=model / "model.safetensors",
    )
    result = fill_slug_dir(resolved, tmp_path / "slugs")
    assert slug_state(Path(result.slug_dir)) == {"config.json": str(model / "config.json")}
    assert read_record(result.slug_dir) == result


def test_a_symlink_pointing_outside_the_snapshot_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    outside = _write(tmp_path / "elsewhere" / "secret.json", "secret")
    _write(model / "model.safetensors", "W")
    _write(model / "real_config.json", "{}")
    (model / "config.json").symlink_to(outside)
    (model / "notes.json").symlink_to("../elsewhere/secret.json")
    (model / "alias.json").symlink_to("real_config.json")  # inside: fine
    (model / "dangling.json").symlink_to("missing.json")

    result = harvest(str(model), tmp_path / "slugs")
    state = slug_state(Path(result.slug_dir))
    assert state == {
        "alias.json": str(model / "real_config.json"),
        "real_config.json": str(model / "real_config.json"),
    }
    assert result.refused_files == ["config.json", "notes.json"]


def test_a_symlinked_model_directory_is_followed(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    link = tmp_path / "current"
    link.symlink_to(model)
    result = harvest(str(link), tmp_path / "slugs")
    assert result.refused_files == []
    assert slug_state(Path(result.slug_dir))["config.json"] == str(model / "config.json")


def test_two_harvests_in_a_row_give_the_same_result(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    first = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(first.slug_dir)
    inodes = {name: os.lstat(slug_dir / name).st_ino for name in slug_state(slug_dir)}
    second = harvest(str(model), tmp_path / "slugs")
    assert comparable(first) == comparable(second)
    # Nothing was re-linked: the links are the very same directory entries.
    assert {name: os.lstat(slug_dir / name).st_ino for name in slug_state(slug_dir)} == inodes


def test_read_record_only_vouches_for_a_complete_matching_directory(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    result = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(result.slug_dir)
    assert read_record(slug_dir) == result
    assert read_record(tmp_path / "slugs" / "other") is None

    (slug_dir / "tokenizer.json").unlink()
    (slug_dir / "tokenizer.json").symlink_to(model / "config.json")
    assert read_record(slug_dir) is None  # a link no longer says what the record says

    harvest(str(model), tmp_path / "slugs")
    (model / "preprocessor_config.json").unlink()
    assert read_record(slug_dir) is None  # a target is gone

    renamed = slug_dir.with_name("renamed")
    harvest(str(model), tmp_path / "slugs")
    slug_dir.rename(renamed)
    assert read_record(renamed) is None  # the record names another slug

    _write(renamed / RECORD_NAME, "{not json")
    assert read_record(renamed) is None


# --------------------------------------------------------------------------------------
# Kill safety: SIGKILL after every filesystem change the harvest makes, then re-run.

# Runs a harvest in a child process that reports each filesystem change it makes on
# stdout and then waits for a line on stdin, so the test can SIGKILL it at exactly
# that point.
_DRIVER = r"""
import os, sys
from modeldeploy.server.harvest import harvest

def pausing(fn, name):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        print(name, args[-1], flush=True)
        sys.stdin.readline()
        return out
    return wrapper

for op in ("symlink", "replace", "unlink", "mkdir"):
    setattr(os, op, pausing(getattr(os, op), op))
harvest(sys.argv[1], sys.argv[2])
print("done", flush=True)
"""


def _kill_after(ops: int, source: str, slug_root: Path) -> bool:
    """Run the driver, let `ops` changes happen, SIGKILL it. False when it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, source, str(slug_root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for i in range(ops):
            line = proc.stdout.readline()
            if not line or line.startswith("done"):
                return False
            if i < ops - 1:
                proc.stdin.write("\n")
                proc.stdin.flush()
        proc.send_signal(signal.SIGKILL)
        return True
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()


@pytest.mark.parametrize("start", ["empty", "older", "removed"])
def test_a_harvest_killed_at_any_point_and_rerun_ends_correct(tmp_path: Path, start: str) -> None:
    """Kill after each change, from an empty slug dir or one holding an older harvest.

    "older": the earlier harvest's record still looks valid (all its targets exist),
    so a run that left it in place while re-linking would be caught. "removed": a
    file the earlier harvest linked is gone from the model.
    """
    model = make_model_dir(tmp_path)
    _write(model / "shared" / "v1" / "tokenizer.json", "v1")
    _write(model / "shared" / "v2" / "tokenizer.json", "v2")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("shared/v1/tokenizer.json")
    _write(model / "old_extra.json", "{}")
    stale_root = tmp_path / "stale"
    harvest(str(model), stale_root)
    # The model as it is now.
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("shared/v2/tokenizer.json")
    _write(model / "new_extra.json", "{}")
    if start == "removed":
        (model / "old_extra.json").unlink()

    reference = harvest(str(model), tmp_path / "reference")
    ref_state = slug_state(Path(reference.slug_dir))
    work_root = tmp_path / "work"
    slug_dir = work_root / reference.slug

    ops = 1
    while True:
        shutil.rmtree(work_root, ignore_errors=True)
        if start != "empty":
            shutil.copytree(stale_root, work_root, symlinks=True)
        if not _kill_after(ops, str(model), work_root):
            break
        # Killed: the directory is either vouched for and right, or not vouched for.
        record = read_record(slug_dir) if slug_dir.exists() else None
        if record is not None:
            assert comparable(record) | {"slug_dir": ""} == comparable(reference) | {"slug_dir": ""}
            assert slug_state(slug_dir) == ref_state
        rerun = harvest(str(model), work_root)
        assert slug_state(slug_dir) == ref_state, f"after a kill at change {ops}"
        assert comparable(rerun) | {"slug_dir": ""} == comparable(reference) | {"slug_dir": ""}
        assert read_record(slug_dir) == rerun
        assert not [n for n in os.listdir(slug_dir) if "tmp" in n]
        ops += 1
    # Every link (temp link + rename), the stale clean-up and the record were kill points.
    assert ops > (2 * len(ref_state) if start == "empty" else 6)


# --------------------------------------------------------------------------------------
# hf:// harvests through the local hub server


def test_hf_harvest_links_blobs_and_base_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "hub"
    _write(root / "org/Tiny-GGUF/tiny-Q4_0.gguf", "GGUF")
    _write(root / "org/Tiny-GGUF/config.json", '{"from": "gguf repo"}')
    _write(root / "org/Tiny-GGUF/README.md", "readme")
    _write(root / "org/Tiny/tokenizer.json", '{"from": "base"}')
    _write(root / "org/Tiny/tokenizer_config.json", "{}")
    _write(root / "org/Tiny/config.json", '{"from": "base"}')
    cache = tmp_path / "cache"
    with HubServer(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = harvest("hf://org/Tiny-GGUF", tmp_path / "slugs", cache_dir=cache, quant="q4_0")
    slug_dir = Path(result.slug_dir)
    assert result.slug.startswith("org--tiny-gguf--main--q4_0--")
    assert sorted(slug_state(slug_dir)) == [
        "README.md",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (slug_dir / "config.json").read_text() == '{"from": "gguf repo"}'
    assert (slug_dir / "tokenizer.json").read_text() == '{"from": "base"}'
    for target in slug_state(slug_dir).values():
        assert Path(target).parent.name == "blobs" and Path(target).is_relative_to(cache)
    assert Path(result.model_path).read_text() == "GGUF"


def test_hf_cache_links_into_blobs_are_allowed_links_elsewhere_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    cache = tmp_path / "cache"
    commit = seed_cache(cache, "org/M", {"model.safetensors": b"W", "config.json": b"{}"})
    snapshot = cache / "models--org--M" / "snapshots" / commit
    outside = _write(tmp_path / "outside" / "stolen.json", "{}")
    (snapshot / "stolen.json").symlink_to(outside)
    result = harvest("hf://org/M", tmp_path / "slugs", cache_dir=cache)
    assert result.refused_files == ["stolen.json"]
    assert list(slug_state(Path(result.slug_dir))) == ["config.json"]
    assert "/blobs/" in result.linked_files["config.json"]


def test_hf_harvest_after_an_upstream_commit_relinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "hub"
    _write(root / "org/M/model.safetensors", "W")
    _write(root / "org/M/config.json", '{"v": 1}')
    _write(root / "org/M/added_tokens.json", "{}")
    with HubServer(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        first = harvest("hf://org/M", tmp_path / "slugs", cache_dir=tmp_path / "cache")
        _write(root / "org/M/config.json", '{"v": 2}')
        (root / "org/M/added_tokens.json").unlink()
        second = harvest("hf://org/M", tmp_path / "slugs", cache_dir=tmp_path / "cache")
    assert first.slug == second.slug and first.revision != second.revision
    slug_dir = Path(second.slug_dir)
    assert json.loads((slug_dir / "config.json").read_text()) == {"v": 2}
    assert sorted(slug_state(slug_dir)) == ["config.json"]


def test_hf_slug_dir_loads_with_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models
) -> None:
    """The point of the harvest: a directory-based loader finds everything but the weights."""
    root = tmp_path / "hub"
    shutil.copytree(tiny_models.hf("qwen2"), root / "org" / "TinyQwen")
    with HubServer(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = harvest("hf://org/TinyQwen", tmp_path / "slugs", cache_dir=tmp_path / "cache")
    from transformers import AutoConfig, AutoTokenizer

    slug_dir = Path(result.slug_dir)
    assert "preprocessor_config.json" in result.linked_files
    assert AutoConfig.from_pretrained(slug_dir).model_type == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(slug_dir)
    assert tokenizer.decode(tokenizer.encode("hello world")).endswith("hello world")
