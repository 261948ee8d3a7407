"""How the engine's memory is laid out in pages: the C heap's thresholds, huge pages for
the weights, small pages for the KV cache, and file pages handed back.

A decode step streams every weight once (Qwen2.5-0.5B: 424 MB), so the pages the
weights sit in show up in tokens/s. Read through the conversion cache's file mapping
(4 kB pages) they decode ~6% slower than from anonymous memory advised for 2 MB pages
(measured through HTTP: 26.2 against 27.8 tok/s), so cached weights are moved there
(`to_anonymous`). The KV cache is the exception: each slot touches only the positions
it has reached, and where the kernel hands out huge pages unasked (THP "always"), every
touch would cost 2 MB.

Everything here degrades to a no-op where glibc or madvise is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, like the rest of the engine's heavy modules
    import torch

#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: While loading: temporaries of 1 MB and more get their own mappings. Loading frees and
#: reallocates hundreds of MB of conversion and packing temporaries between the long-lived
#: packed weights; from the heap they left holes that raised the load's peak RSS by
#: ~170 MB (measured on Qwen2.5-0.5B: 737 -> 571 MB peak, load time unchanged).
LOAD_MMAP_THRESHOLD = 1 << 20
#: While serving: glibc's own ceiling for its dynamic threshold, and twice that for
#: trimming, as its dynamic adjustment would settle on: the activations a step allocates
#: and frees are then reused from the heap rather than mapped, trimmed and faulted in
#: again each step (setting either once turns the dynamic adjustment off for good;
#: leaving trimming at its 128 kB default cost 4% of decode and 8% at 16 streams).
SERVE_MMAP_THRESHOLD = 32 << 20
SERVE_TRIM_THRESHOLD = 2 * SERVE_MMAP_THRESHOLD


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _pages(addr: int, nbytes: int, *, inner: bool) -> tuple[int, int]:
    """[start, end) of the whole pages inside the range (`inner`) or covering it."""
    page = mmap.PAGESIZE
    if inner:
        return -(-addr // page) * page, (addr + nbytes) // page * page
    return addr // page * page, -(-(addr + nbytes) // page) * page


def _madvise(addr: int, nbytes: int, advice: int | None, *, inner: bool) -> bool:
    """madvise over whole pages (see `_pages`); True when the kernel took the advice.
    `advice` None (not defined on this platform) does nothing."""
    if advice is None:
        return False
    start, end = _pages(addr, nbytes, inner=inner)
    libc = _libc()
    if libc is None:
        return False
    if end <= start:
        return True
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) == 0


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.untyped_storage().nbytes()


def release_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) the whole pages of a tensor that lives in a read-only file
    mapping: they leave the process's RSS and would fault back from the file if touched.
    Never for anonymous memory, which DONTNEED would zero."""
    nbytes = t.numel() * t.element_size()
    _madvise(t.data_ptr(), nbytes, getattr(mmap, "MADV_DONTNEED", None), inner=True)


def can_hand_back_pages() -> bool:
    """Whether `zero_pages` zeroes memory by handing it back (else by writing zeros)."""
    return _libc() is not None and hasattr(mmap, "MADV_DONTNEED")


def zero_pages(t: torch.Tensor) -> None:
    """Zero a contiguous CPU tensor that torch allocated (private anonymous memory) by
    handing its whole pages back to the kernel: they read as zeros and cost no memory
    until something writes them. Only the partial pages at its two ends are written.

    Why: the KV cache is zeroed slot by slot when a sequence leaves, so the positions a
    finished long prompt reached stop counting against the pod's memory, and a slot
    costs memory only for the positions its sequence writes. Never for a tensor in a
    file mapping, whose pages would read back from the file, not as zeros.
    """
    flat = t.view(-1)
    addr, elem = t.data_ptr(), t.element_size()
    start, end = _pages(addr, flat.numel() * elem, inner=True)
    if end <= start:
        flat.zero_()
        return
    head, tail = (start - addr) // elem, (end - addr) // elem
    flat[:head].zero_()
    flat[tail:].zero_()
    if not _madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", None), inner=True):
        flat[head:tail].zero_()


def small_pages(t: torch.Tensor) -> None:
    """Keep a freshly allocated, untouched tensor out of huge pages (the KV cache)."""
    _madvise(*_span(t), getattr(mmap, "MADV_NOHUGEPAGE", None), inner=False)


#: Transparent huge pages come in 2 MB on x86-64 and arm64 with 4 kB base pages.
HUGE_PAGE = 2 << 20


def to_anonymous(t: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor held in a file mapping (the conversion cache), in fresh
    anonymous memory advised for huge pages; the file's pages are handed back.

    Its own 2 MB-aligned mapping, so every page of it is new when the copy touches it
    (reused heap memory already sits in 4 kB pages). Costs one copy.
    """
    import torch

    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE or not t.is_contiguous():
        out = t.clone()
    else:
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        offset = -addr % HUGE_PAGE
        _madvise(addr + offset, nbytes, getattr(mmap, "MADV_HUGEPAGE", None), inner=True)
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
        out = flat.view(t.dtype).view(t.shape)  # the tensor keeps `buf` alive
        out.copy_(t)
    release_pages(t)
    return out


@contextlib.contextmanager
def loading_heap() -> Iterator[None]:
    """glibc's mmap threshold for loading, then for serving (see the constants)."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, SERVE_TRIM_THRESHOLD)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`).

    Loading frees hundreds of MB of conversion and packing temporaries; glibc keeps them
    in its per-thread arenas, where they would count against the pod's memory limit for
    the life of the process.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
