"""What the kernel says about this process's mappings (Linux /proc/self/smaps)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")


def _mappings() -> Iterator[tuple[int, int, dict[str, str]]]:
    """(start, end, smaps fields) of every mapping of this process; the fields hold the
    mapped file under "path" ("" if anonymous), "Rss" reads like "1088 kB", "VmFlags"
    like "rd wr mr mw me ac nh"."""
    current: tuple[int, int, dict[str, str]] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                if current is not None:
                    yield current
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                current = (lo, hi, {"path": fields[5] if len(fields) > 5 else ""})
            elif current is not None:
                key, _, value = line.partition(":")
                current[2][key] = value.strip()
    if current is not None:
        yield current


def mapping_of(addr: int) -> dict[str, str]:
    """The smaps fields of the mapping holding `addr` (see `_mappings`)."""
    for lo, hi, fields in _mappings():
        if lo <= addr < hi:
            return fields
    raise LookupError(f"no mapping holds {addr:#x}")


def _kb(fields: dict[str, str]) -> int:
    return int(fields["Rss"].split()[0])


def resident_kb(addr: int) -> int:
    """Resident kB of the mapping holding `addr`."""
    return _kb(mapping_of(addr))


def file_resident_kb(path: str) -> int:
    """Resident kB of every mapping of the file at `path` in this process (0 if none)."""
    return sum(_kb(fields) for _, _, fields in _mappings() if fields["path"] == str(path))


def resident_pages(addr: int, nbytes: int) -> int:
    """How many of the pages covering [addr, addr + nbytes) are resident (mincore(2))."""
    page = mmap.PAGESIZE
    start, end = addr // page * page, -(-(addr + nbytes) // page) * page
    vec = (ctypes.c_ubyte * ((end - start) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(b & 1 for b in vec)
