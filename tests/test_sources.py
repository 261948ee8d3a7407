"""Model sources: parsing, slugs, local resolution and hf:// through the real huggingface_hub.

hf:// runs without internet in two ways: against a hand-seeded cache with
HF_HUB_OFFLINE=1 (an air-gapped cluster), and against tests/hubserver.py, a local
HTTP server with the Hub's endpoints, reached through HF_ENDPOINT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import DEAD_ENDPOINT, HubServer, seed_cache
from modeldeploy.server.errors import SourceError, UserInputError
from modeldeploy.server.slug import MAX_SLUG_LENGTH, slug_for
from modeldeploy.server.sources import (
    Source,
    hub_cache_dir,
    parse_source,
    resolve,
    select_gguf,
)

# --------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/models/qwen", Source("file", "/models/qwen", path="/models/qwen")),
        ("/models/x/../qwen/", Source("file", "/models/x/../qwen/", path="/models/qwen")),
        ("file:///m/a.gguf", Source("file", "file:///m/a.gguf", path="/m/a.gguf")),
        (
            "hf://Qwen/Qwen2.5-0.5B",
            Source("hf", "hf://Qwen/Qwen2.5-0.5B", repo_id="Qwen/Qwen2.5-0.5B"),
        ),
        (
            "hf://org/repo@refs/pr/1",
            Source("hf", "hf://org/repo@refs/pr/1", repo_id="org/repo", revision="refs/pr/1"),
        ),
        (
            "pvc://models/qwen/q.gguf",
            Source("pvc", "pvc://models/qwen/q.gguf", claim="models", path="qwen/q.gguf"),
        ),
        ("pvc://models", Source("pvc", "pvc://models", claim="models", path="")),
    ],
)
def test_parse_accepts_the_documented_forms(text: str, expected: Source) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("models/qwen", "relative"),
        ("./qwen", "relative"),
        ("s3://bucket/model", "unknown scheme 's3://'"),
        ("file://relative/path", "absolute"),
        ("hf://just-a-name", "ORG/REPO"),
        ("hf://org/repo/extra", "ORG/REPO"),
        ("hf://org/..", "ORG/REPO"),
        ("hf://org/repo@", "REVISION"),
        ("pvc://Bad_Claim/x", "claim"),
        ("pvc://claim/../etc", ".."),
        ("", "empty"),
    ],
)
def test_parse_refuses_with_the_source_and_accepted_forms(text: str, reason: str) -> None:
    with pytest.raises(SourceError) as err:
        parse_source(text)
    message = str(err.value)
    assert repr(text) in message and reason in message
    assert "hf://ORG/REPO[@REVISION]" in message and "\n" not in message
    assert isinstance(err.value, UserInputError)


def test_pvc_parses_but_does_not_resolve_outside_the_operator() -> None:
    with pytest.raises(SourceError, match="operator"):
        resolve("pvc://models/qwen")


def test_sources_and_slugs_import_without_torch_or_huggingface_hub() -> None:
    code = (
        "import sys, modeldeploy.server.sources, modeldeploy.server.slug, "
        "modeldeploy.server.harvest; "
        "bad = [m for m in ('torch', 'huggingface_hub') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------
# slugs


def test_slug_is_readable_short_and_deterministic() -> None:
    src = parse_source("hf://Qwen/Qwen2.5-0.5B-Instruct")
    slug = slug_for(src, None, None)
    assert slug.startswith("qwen--qwen2.5-0.5b-instruct--main--")
    assert slug == slug_for(parse_source("hf://Qwen/Qwen2.5-0.5B-Instruct"), None, None)
    # The default revision is "main", however it is spelled.
    assert slug == slug_for(parse_source("hf://Qwen/Qwen2.5-0.5B-Instruct@main"), None, None)
    assert slug == slug_for(src, "main", None)


def test_slug_separates_every_part_of_the_triple() -> None:
    src = parse_source("hf://org/Model-GGUF")
    slugs = {
        slug_for(src, None, None),
        slug_for(src, "v2", None),
        slug_for(src, None, "Q4_K_M"),
        slug_for(src, None, "Q8_0"),
        slug_for(parse_source("hf://org/Model"), None, None),
        slug_for(parse_source("/models/org/Model-GGUF"), None, None),
    }
    assert len(slugs) == 6
    assert slug_for(src, None, "q4_k_m") == slug_for(src, None, "Q4_K_M")  # quant is case-blind


@pytest.mark.parametrize(
    "text",
    [
        "/models/a b/ünïcode model!/weights.gguf",
        "hf://" + "o" * 90 + "/" + "r" * 90 + "@" + "x" * 200,
        "pvc://claim/" + "deep/" * 30 + "Model.GGUF",
        "/",
    ],
)
def test_slug_is_filesystem_and_label_safe(text: str) -> None:
    slug = slug_for(parse_source(text), None, "Q4 K/M" if text.startswith("/m") else None)
    assert 0 < len(slug) <= MAX_SLUG_LENGTH
    assert all(c.isascii() and (c.isalnum() or c in "-._") for c in slug)
    assert slug[0].isalnum() and slug[-1].isalnum()


def test_conflicting_revisions_are_refused() -> None:
    with pytest.raises(SourceError, match="conflicts"):
        slug_for(parse_source("hf://org/repo@v1"), "v2", None)


# --------------------------------------------------------------------------------------
# GGUF selection


def test_select_gguf_by_quant_case_insensitively() -> None:
    names = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md"]
    assert select_gguf(names, "q8_0", "here") == ["m-Q8_0.gguf"]
    assert select_gguf(["only.gguf"], None, "here") == ["only.gguf"]


def test_select_gguf_keeps_split_parts_together() -> None:
    names = [
        "big-Q4_0-00002-of-00002.gguf",
        "big-Q4_0-00001-of-00002.gguf",
        "big-Q8_0.gguf",
    ]
    assert select_gguf(names, "Q4_0", "here") == [
        "big-Q4_0-00001-of-00002.gguf",
        "big-Q4_0-00002-of-00002.gguf",
    ]


@pytest.mark.parametrize(("quant", "reason"), [("Q5", "no .gguf file matches"), ("Q", "several")])
def test_select_gguf_errors_list_what_is_available(quant: str, reason: str) -> None:
    with pytest.raises(SourceError) as err:
        select_gguf(["m-Q4_0.gguf", "m-Q8_0.gguf"], quant, "hf://o/r@main")
    assert reason in str(err.value)
    assert "m-Q4_0.gguf, m-Q8_0.gguf" in str(err.value)


# --------------------------------------------------------------------------------------
# local sources


def _write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_local_directory_model_path_prefers_the_index(tmp_path: Path) -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    _write(tmp_path / "model.safetensors.index.json", json.dumps(index))
    for shard in index["weight_map"].values():
        _write(tmp_path / shard)
    _write(tmp_path / "config.json", "{}")
    res = resolve(str(tmp_path))
    assert res.model_path == tmp_path / "model.safetensors.index.json"
    assert sorted(p.name for p in res.weight_files) == sorted(index["weight_map"].values())
    assert [s.path for s in res.snapshot_dirs] == [tmp_path]


def test_local_file_source_uses_its_parent_as_snapshot(tmp_path: Path) -> None:
    gguf = _write(tmp_path / "m-Q4_0.gguf", b"GGUF")
    res = resolve(f"file://{gguf}")
    assert res.model_path == gguf and res.weight_files == (gguf,)
    assert [s.path for s in res.snapshot_dirs] == [tmp_path]


def test_local_directory_with_several_ggufs_needs_quant(tmp_path: Path) -> None:
    _write(tmp_path / "m-Q4_0.gguf")
    _write(tmp_path / "m-Q8_0.gguf")
    with pytest.raises(SourceError, match="several"):
        resolve(str(tmp_path))
    assert resolve(str(tmp_path), quant="q8").model_path == tmp_path / "m-Q8_0.gguf"


def test_missing_local_path_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve(str(tmp_path / "nope"))


def test_a_non_model_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a model file"):
        resolve(str(_write(tmp_path / "config.json", "{}")))


# --------------------------------------------------------------------------------------
# hf://: cache location


def test_hub_cache_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert hub_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert hub_cache_dir() == tmp_path / "hubcache"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.delenv("HF_HOME")
    from huggingface_hub import constants

    assert hub_cache_dir() == Path(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------
# hf://: a hand-seeded cache, offline


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)


def test_offline_resolve_from_a_seeded_cache(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "cache"
    commit = seed_cache(
        cache,
        "org/Tiny",
        {
            "config.json": b"{}",
            "tokenizer.json": b"{}",
            "model.safetensors": b"W",
            "special_tokens_map.json": b"{}",
        },
    )
    res = resolve("hf://org/Tiny", cache_dir=cache)
    snapshot = cache / "models--org--Tiny" / "snapshots" / commit
    assert res.revision == commit and res.ref == "main"
    assert res.model_path == snapshot / "model.safetensors"
    assert [s.path for s in res.snapshot_dirs] == [snapshot]


def test_an_unreachable_hub_falls_back_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    seed_cache(tmp_path, "org/Tiny", {"config.json": b"{}", "model.safetensors": b"W"})
    assert resolve("hf://org/Tiny", cache_dir=tmp_path).model_path.read_bytes() == b"W"
    with pytest.raises(SourceError, match=r"not in the cache .* hub is not reachable"):
        resolve("hf://org/Other", cache_dir=tmp_path)


def test_offline_without_the_repo_cached_says_so(tmp_path: Path, offline: None) -> None:
    with pytest.raises(SourceError, match="not in the cache"):
        resolve("hf://org/Absent", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------
# hf://: the local hub server


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    files = {
        "org/Tiny/config.json": '{"model_type": "qwen2"}',
        "org/Tiny/tokenizer.json": '{"base": true}',
        "org/Tiny/tokenizer_config.json": '{"chat_template": "x"}',
        "org/Tiny/model.safetensors": "W",
        "org/Tiny/pytorch_model.bin": "legacy weights",
        "org/Tiny/flax_model.msgpack": "flax weights",
        "org/Tiny/preprocessor_config.json": "{}",
        "org/Tiny/onnx/model.onnx": "onnx",
        "org/Tiny/onnx/config.json": "{}",
        "org/Tiny-GGUF/tiny-Q4_K_M.gguf": "GGUF q4",
        "org/Tiny-GGUF/tiny-Q8_0.gguf": "GGUF q8",
        "org/Tiny-GGUF/README.md": "readme",
        "org/Tiny-GGUF/config.json": '{"gguf": true}',
    }
    for name, data in files.items():
        _write(root / name, data)
    return root


@pytest.fixture
def hub(hub_root: Path, monkeypatch: pytest.MonkeyPatch):
    with HubServer(hub_root, tokens={"org/Private": "hf_secret_token"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def test_hf_safetensors_downloads_weights_and_non_weights_only(
    hub: HubServer, tmp_path: Path
) -> None:
    res = resolve("hf://org/Tiny", cache_dir=tmp_path / "cache")
    assert sorted(hub.downloads()) == [
        "org/Tiny/config.json",
        "org/Tiny/model.safetensors",
        "org/Tiny/preprocessor_config.json",
        "org/Tiny/tokenizer.json",
        "org/Tiny/tokenizer_config.json",
    ]
    assert res.model_path.name == "model.safetensors"
    assert res.model_path.read_bytes() == b"W"
    assert res.revision == hub.commit("org/Tiny")


def test_hf_gguf_quant_selection_downloads_one_gguf(hub: HubServer, tmp_path: Path) -> None:
    res = resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache", quant="q8_0")
    gguf_downloads = [d for d in hub.downloads() if d.endswith(".gguf")]
    assert gguf_downloads == ["org/Tiny-GGUF/tiny-Q8_0.gguf"]
    assert res.model_path.read_bytes() == b"GGUF q8"
    assert res.weight_files == (res.model_path,)


def test_hf_gguf_ambiguous_quant_lists_the_files(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache")
    assert "tiny-Q4_K_M.gguf, tiny-Q8_0.gguf" in str(err.value)
    assert not [d for d in hub.downloads() if d.endswith(".gguf")]


def test_hf_gguf_repo_takes_tokenizer_files_from_the_base_repo(
    hub: HubServer, tmp_path: Path
) -> None:
    res = resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache", quant="Q4_K_M")
    base_downloads = sorted(d for d in hub.downloads() if d.startswith("org/Tiny/"))
    assert base_downloads == ["org/Tiny/tokenizer.json", "org/Tiny/tokenizer_config.json"]
    assert len(res.snapshot_dirs) == 2
    base = res.snapshot_dirs[1].path
    assert (base / "tokenizer.json").read_text() == '{"base": true}'
    assert not (base / "config.json").exists()  # only the tokenizer files come from the base


def test_hf_gguf_repo_with_its_own_tokenizer_skips_the_base(
    hub: HubServer, hub_root: Path, tmp_path: Path
) -> None:
    _write(hub_root / "org/Tiny-GGUF/tokenizer.json", '{"own": true}')
    res = resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache", quant="Q4")
    assert len(res.snapshot_dirs) == 1
    assert not [d for d in hub.downloads() if d.startswith("org/Tiny/")]


def test_hf_gguf_repo_without_a_base_repo_still_resolves(
    hub: HubServer, hub_root: Path, tmp_path: Path
) -> None:
    _write(hub_root / "org/Solo-GGUF/solo-Q4_0.gguf", "GGUF")
    res = resolve("hf://org/Solo-GGUF", cache_dir=tmp_path / "cache")
    assert res.model_path.read_bytes() == b"GGUF"
    assert len(res.snapshot_dirs) == 1
    assert ("GET", "/api/models/org/Solo/revision/main") in hub.requests  # it did look


def test_hf_private_repo_uses_hf_token(
    hub: HubServer, hub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(hub_root / "org/Private/model.safetensors", "P")
    with pytest.raises(SourceError, match="set HF_TOKEN"):
        resolve("hf://org/Private", cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    assert resolve("hf://org/Private", cache_dir=tmp_path / "cache").model_path.read_bytes() == b"P"


def test_hf_unknown_repo_and_revision(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="repository not found"):
        resolve("hf://org/Nope", cache_dir=tmp_path)
    with pytest.raises(SourceError, match="revision 'v9' not found"):
        resolve("hf://org/Tiny@v9", cache_dir=tmp_path)


def test_hf_then_offline_reuses_the_cache(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache", quant="Q4_K_M")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    seen = len(hub.requests)
    offline = resolve("hf://org/Tiny-GGUF", cache_dir=tmp_path / "cache", quant="Q4_K_M")
    assert len(hub.requests) == seen
    assert offline == online


def test_hf_listing_with_unsafe_names_is_refused(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    class Sibling:
        rfilename = "../../escape.json"

    class Info:
        sha = "0" * 40
        siblings = [Sibling()]

    monkeypatch.setattr(HfApi, "model_info", lambda self, *a, **k: Info())
    with pytest.raises(SourceError, match="unsafe file name"):
        resolve("hf://org/Tiny", cache_dir=tmp_path)
    assert hub.downloads() == []
