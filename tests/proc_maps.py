"""What the kernel says about this process's mappings (Linux /proc/self/smaps)."""

from __future__ import annotations

import os

import pytest

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")


def mapping_of(addr: int) -> dict[str, str]:
    """The smaps fields of the mapping holding `addr`, its file under "path" ("" if
    anonymous); "Rss" reads like "1088 kB", "VmFlags" like "rd wr mr mw me ac nh"."""
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
    if found is None:
        raise LookupError(f"no mapping holds {addr:#x}")
    return found


def resident_kb(addr: int) -> int:
    """Resident kB of the mapping holding `addr`."""
    return int(mapping_of(addr)["Rss"].split()[0])


def file_resident_kb(path: str) -> int:
    """Resident kB of every mapping of the file at `path` in this process (0 if none)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                inside = len(fields) > 5 and fields[5] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(fields[1])
    return total
