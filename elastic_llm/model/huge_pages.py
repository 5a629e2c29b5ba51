"""Transparent huge pages for the engine's large CPU buffers (Linux; a no-op elsewhere).

A CPU decode step streams every weight matrix from memory (540 MB for SmolLM2-135M in fp32). On
4 KiB pages that is 130k pages per step, each a TLB miss; on 2 MiB pages it is a few hundred.
Backing the packed weights (and then the KV pool) by transparent huge pages made whole batch-32
runs 2-5% faster on the 2-core development machine (docs/benchmarks.md, run 8).

`backing_new_memory()` wraps code that allocates and fills large buffers whose addresses Python
cannot see (tensors made inside C++ kernels, oneDNN's opaque packed weights). Anonymous memory
newly mapped inside the block (new mappings, the heap's new tail) is marked ``MADV_HUGEPAGE`` and
collapsed into huge pages (``MADV_COLLAPSE``, Linux 6.1+): a copy, about 1.5 ms per 2 MiB, done on
a background thread by default so that the caller is not held up; until it is done the small
pages serve.

The KV pool is not backed this way. It grows while requests wait, and marking its fresh memory
before the first touch made each growth up to 5x slower: a huge-page fault may compact memory
where THP ``defrag`` is ``madvise``. The pool stays on small pages (docs/benchmarks.md, issue 20).

Only whole 2 MiB-aligned pieces of a range can become huge pages. Where the kernel has THP
turned off (``never``), or ``ELASTIC_LLM_HUGE_PAGES=0``, nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20  #: bytes in one transparent huge page on x86-64 and arm64 (4 KiB base pages)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_libc: ctypes.CDLL | None = None


@dataclass(frozen=True)
class Region:
    """A range of virtual addresses ``[start, end)``."""

    start: int
    end: int

    def aligned(self) -> Region | None:
        """The largest 2 MiB-aligned range inside this one, or None if there is none."""
        start = -(-self.start // HUGE_PAGE) * HUGE_PAGE
        end = self.end // HUGE_PAGE * HUGE_PAGE
        return Region(start, end) if end > start else None

    @property
    def nbytes(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


def enabled() -> bool:
    """Whether huge pages may be requested: Linux, the kernel's THP not ``never``, and
    ``ELASTIC_LLM_HUGE_PAGES`` not "0"."""
    if os.environ.get("ELASTIC_LLM_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def anonymous_regions() -> dict[int, int]:
    """This process's private writable anonymous mappings (the C heap included): {start: end}."""
    regions: dict[int, int] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                path = fields[5] if len(fields) > 5 else ""
                if fields[1].startswith("rw") and fields[1].endswith("p") and path in ("", "[heap]"):
                    start, end = (int(bound, 16) for bound in fields[0].split("-"))
                    regions[start] = end
    except OSError:
        pass
    return regions


def new_ranges(before: dict[int, int], after: dict[int, int]) -> list[Region]:
    """Address ranges mapped in `after` and not in `before`: new mappings, the tails of grown ones
    (the heap) and new mappings merged into old neighbours. Memory reused inside old mappings is
    not included."""
    old = sorted(before.items())
    ranges: list[Region] = []
    for start, end in sorted(after.items()):
        cursor = start
        for old_start, old_end in old:
            if old_end <= cursor or old_start >= end:
                continue
            if old_start > cursor:
                ranges.append(Region(cursor, old_start))
            cursor = max(cursor, old_end)
        if cursor < end:
            ranges.append(Region(cursor, end))
    return ranges


def advise(regions: Sequence[Region], collapse: bool) -> int:
    """Mark the aligned part of each region ``MADV_HUGEPAGE`` and, with `collapse`, collapse it
    into huge pages now. Returns the bytes the kernel accepted (0 where refused or off)."""
    libc = _load_libc()
    if libc is None:
        return 0
    done = 0
    for region in regions:
        aligned = region.aligned()
        if aligned is None:
            continue
        if libc.madvise(aligned.start, aligned.nbytes, MADV_HUGEPAGE) != 0:
            continue
        if collapse and libc.madvise(aligned.start, aligned.nbytes, MADV_COLLAPSE) != 0:
            errno = ctypes.get_errno()
            log.debug("MADV_COLLAPSE of %d bytes refused (errno %d)", aligned.nbytes, errno)
            continue
        done += aligned.nbytes
    return done


class Collapse:
    """Huge-page backing of memory allocated inside a `backing_new_memory` block, possibly still
    in progress on a background thread."""

    def __init__(self, regions: list[Region], background: bool) -> None:
        self.regions = regions
        self.nbytes = 0  #: bytes collapsed into huge pages (final once `wait` returns)
        self._thread: threading.Thread | None = None
        if background and regions:
            self._thread = threading.Thread(target=self._run, name="huge-pages", daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        self.nbytes = advise(self.regions, collapse=True)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the collapse is done (or `timeout` seconds); returns the bytes collapsed."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.nbytes


@contextmanager
def backing_new_memory(background: bool = True) -> Iterator[list[Collapse]]:
    """Back the anonymous memory mapped or grown inside the block by huge pages. Yields a list
    that holds the `Collapse` after the block (empty when huge pages are off)."""
    result: list[Collapse] = []
    if not enabled():
        yield result
        return
    before = anonymous_regions()
    yield result
    result.append(Collapse(new_ranges(before, anonymous_regions()), background))


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc
