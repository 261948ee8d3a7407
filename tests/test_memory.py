"""Page-level memory handling of the engine (server/engine/memory.py), checked through
what the kernel reports in /proc/self/smaps."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from modeldeploy.server.engine import memory

linux = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")


def _vma_of(addr: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `addr` (path under "path")."""
    found: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                if found is not None:
                    break
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= addr < hi:
                    found = {"path": fields[5] if len(fields) > 5 else ""}
            elif found is not None:
                key, _, value = line.partition(":")
                found[key] = value.strip()
    assert found is not None
    return found


@linux
def test_to_anonymous_copies_out_of_the_file_and_hands_its_pages_back(tmp_path):
    """A cached weight read through the file mapping becomes an equal tensor in
    anonymous memory, and the file's pages leave the process's RSS."""
    data = np.random.default_rng(0).integers(-128, 127, 4 << 20, dtype=np.int8)
    path = tmp_path / "cache.bin"
    data.tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=data.size, dtype=torch.int8)
    assert _vma_of(mapped.data_ptr())["path"] == str(path)
    assert int(mapped.sum()) == int(data.astype(np.int64).sum())  # touch every page
    assert int(_vma_of(mapped.data_ptr())["Rss"].split()[0]) >= 4000  # kB
    copy = memory.to_anonymous(mapped)
    assert torch.equal(copy, torch.from_numpy(data))
    assert _vma_of(copy.data_ptr())["path"] != str(path)
    assert "hg" in _vma_of(copy.data_ptr())["VmFlags"].split()  # advised for huge pages
    assert int(_vma_of(mapped.data_ptr())["Rss"].split()[0]) == 0


@linux
def test_small_pages_keeps_a_kv_cache_out_of_huge_pages():
    """A KV cache is touched one slot's positions at a time: its mapping says no huge
    pages (VmFlags "nh"), so touching a slot costs that slot's pages, not 2 MB each."""
    t = torch.empty(8 << 20, dtype=torch.uint8)
    memory.small_pages(t)
    assert "nh" in _vma_of(t.data_ptr())["VmFlags"].split()
