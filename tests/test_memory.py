"""Page-level memory handling of the engine (server/engine/memory.py), checked through
what the kernel reports in /proc/self/smaps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from modeldeploy.server.engine import memory, quant
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.formats.gguf_file import GGUFFile
from proc_maps import file_resident_kb, linux_only, mapping_of, resident_kb


@linux_only
def test_to_anonymous_copies_out_of_the_file_and_hands_its_pages_back(tmp_path):
    """A cached weight read through the file mapping becomes an equal tensor in
    anonymous memory, and the file's pages leave the process's RSS."""
    data = np.random.default_rng(0).integers(-128, 127, 4 << 20, dtype=np.int8)
    path = tmp_path / "cache.bin"
    data.tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=data.size, dtype=torch.int8)
    assert mapping_of(mapped.data_ptr())["path"] == str(path)
    assert int(mapped.sum()) == int(data.astype(np.int64).sum())  # touch every page
    assert resident_kb(mapped.data_ptr()) >= 4000
    copy = memory.to_anonymous(mapped)
    assert torch.equal(copy, torch.from_numpy(data))
    assert mapping_of(copy.data_ptr())["path"] != str(path)
    assert "hg" in mapping_of(copy.data_ptr())["VmFlags"].split()  # advised for huge pages
    assert resident_kb(mapped.data_ptr()) == 0


@linux_only
def test_small_pages_keeps_a_kv_cache_out_of_huge_pages():
    """A KV cache is touched one slot's positions at a time: its mapping says no huge
    pages (VmFlags "nh"), so touching a slot costs that slot's pages, not 2 MB each."""
    t = torch.empty(8 << 20, dtype=torch.uint8)
    memory.small_pages(t)
    assert "nh" in mapping_of(t.data_ptr())["VmFlags"].split()


def private_copy(path: Path, tmp_path: Path) -> Path:
    """A copy no other test maps, so that its resident pages are this test's alone."""
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    return copy


@linux_only
def test_gguf_release_pages_hands_back_what_reading_touched(tiny_models, tmp_path):
    """Reading tensors through the GGUF mapping makes its pages resident; handing them
    back drops them from RSS, and the same bytes can still be read afterwards."""
    path = private_copy(tiny_models.gguf("qwen2", "Q8_0"), tmp_path)
    gguf = GGUFFile.open(path)
    sums = {t.name: int(gguf.raw(t.name).view(np.uint8).sum()) for t in gguf.tensors}
    assert file_resident_kb(str(path)) > 0
    gguf.release_pages()
    assert file_resident_kb(str(path)) == 0
    assert sums == {t.name: int(gguf.raw(t.name).view(np.uint8).sum()) for t in gguf.tensors}


@linux_only
def test_a_loaded_gguf_model_keeps_none_of_its_file_resident(tiny_models, tmp_path, monkeypatch):
    """Once loaded, the model's weights live in their converted form: none of the GGUF
    file's pages should count against the pod's memory any more."""
    path = private_copy(tiny_models.gguf("qwen2", "Q8_0"), tmp_path)
    monkeypatch.setenv(quant.CACHE_ENV, str(tmp_path / "quant"))  # keyed by the copy's path
    engine = Engine.load(path, dtype="bfloat16", device="cpu", max_concurrent=1, max_model_len=64)
    try:
        assert file_resident_kb(str(path)) == 0
    finally:
        engine.close()
