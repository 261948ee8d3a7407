"""Page-level memory handling of the engine (server/engine/memory.py), checked through
what the kernel reports in /proc/self/smaps."""

from __future__ import annotations

import numpy as np
import torch
from modeldeploy.server.engine import memory
from proc_maps import linux_only, mapping_of, resident_kb


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
