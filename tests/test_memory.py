"""Page-level memory handling of the engine (server/engine/memory.py), checked through
what the kernel reports in /proc/self/smaps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from engine_helpers import collect, run
from modeldeploy.server.engine import memory, quant
from modeldeploy.server.engine.engine import Engine
from modeldeploy.server.engine.model import KVCache
from modeldeploy.server.formats.gguf_file import GGUFFile
from proc_maps import file_resident_kb, linux_only, mapping_of, resident_kb, resident_pages


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


@linux_only
def test_zero_pages_zeroes_a_tensor_by_handing_back_all_but_its_edge_pages():
    """Zeroing by madvise: the tensor reads as zeros and keeps at most the two partial
    pages it shares with its neighbours, whose values are left alone."""
    base = torch.full((3 << 20,), float("nan"))  # 12 MB, every page written
    t = base[5:-7]  # both ends inside a page
    nbytes = t.numel() * t.element_size()
    assert resident_pages(t.data_ptr(), nbytes) > 3000
    memory.zero_pages(t)
    assert resident_pages(t.data_ptr(), nbytes) <= 2  # checked before reading maps zero pages
    assert int(torch.count_nonzero(t)) == 0
    assert bool(base[:5].isnan().all()) and bool(base[-7:].isnan().all())


def _kv_pages(cache: KVCache, slot: int | None = None) -> int:
    tensors = [*cache.k, *cache.v]
    parts = tensors if slot is None else [t[slot] for t in tensors]
    return sum(resident_pages(t.data_ptr(), t.numel() * t.element_size()) for t in parts)


def _edge_pages(cache: KVCache) -> int:
    """What one zeroing of every K and V tensor (or of one slot of each) may leave
    resident: the two partial pages at its ends."""
    return 2 * (len(cache.k) + len(cache.v))


@linux_only
def test_kv_cache_release_zeroes_one_slot_and_hands_back_its_pages(tiny_models):
    """A released slot reads as zeros and holds no memory; its neighbours keep their K/V."""
    engine = Engine.load(tiny_models.gguf("qwen2", "Q8_0"), device="cpu", max_model_len=64)
    engine.close()
    cache = KVCache(engine.spec, 3, 4096, torch.float32, "cpu")
    edges = _edge_pages(cache)
    assert _kv_pages(cache) <= edges  # zeroed by handing back, not by writing
    for t in (*cache.k, *cache.v):
        t[0].fill_(1.0)
        t[1].fill_(2.0)
        t[2].fill_(3.0)
    assert _kv_pages(cache, 1) > 10 * edges
    cache.release(1)
    assert _kv_pages(cache, 1) <= edges
    for t in (*cache.k, *cache.v):
        assert int(torch.count_nonzero(t[1])) == 0
        assert bool((t[0] == 1.0).all()) and bool((t[2] == 3.0).all())


@linux_only
def test_a_finished_request_leaves_no_kv_cache_memory_behind(tiny_models):
    """After a long prompt finishes, its slot's K/V no longer count against the pod's
    memory: only the partial pages at the slots' edges stay resident."""
    engine = Engine.load(
        tiny_models.gguf("qwen2", "Q8_0"), device="cpu", max_concurrent=2, max_model_len=512
    )
    try:
        cache = engine.cache
        edges = _edge_pages(cache)
        assert _kv_pages(cache) <= edges
        prompt = [10 + i % 400 for i in range(480)]  # most of a 512-position slot
        result = run(collect(engine, prompt, max_tokens=4, temperature=0.0, ignore_eos=True))
        assert len(result.token_ids) == 4
        assert _kv_pages(cache) <= 2 * edges  # the allocation's edges and the slot's
    finally:
        engine.close()


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
