"""Timing helpers: medians of repeated calls after warm-up, a CPU cache flusher, and a scoped
torch thread count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

K = TypeVar("K")


def interleaved_medians(calls: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 1,
                        before: Callable[[K], object] | None = None) -> dict[K, float]:
    """Median wall seconds of each call, timed round-robin: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds calling every entry once, so that a burst of load from other
    processes spreads over all entries instead of skewing one. ``before(key)`` (untimed) runs
    before each call, e.g. a barrier."""
    if repeats < 1 or warmup < 0:
        raise ValueError("interleaved_medians needs repeats >= 1 and warmup >= 0")
    times: dict[K, list[float]] = {key: [] for key in calls}
    for round_index in range(warmup + repeats):
        for key, call in calls.items():
            if before is not None:
                before(key)
            started = time.perf_counter()
            call()
            if round_index >= warmup:
                times[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return interleaved_medians({0: fn}, repeats, warmup)[0]


#: Last-level cache assumed when sysfs does not say.
DEFAULT_LLC_BYTES = 32 * 2**20


def last_level_cache_bytes() -> int:
    """Size of CPU 0's highest-level cache from Linux sysfs (`DEFAULT_LLC_BYTES` elsewhere)."""
    sizes: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes[level] = max(sizes.get(level, 0), int(digits) * scale)
    return sizes[max(sizes)] if sizes else DEFAULT_LLC_BYTES


class CacheFlusher:
    """Evicts the CPU caches by writing a buffer twice the last-level cache when called, so that
    the next timed call reads its weights from memory, as a layer does inside a whole stage whose
    weights exceed the cache."""

    def __init__(self, nbytes: int | None = None) -> None:
        """Allocate the buffer (default: twice `last_level_cache_bytes`)."""
        size = nbytes if nbytes is not None else 2 * last_level_cache_bytes()
        self._buffer = torch.zeros(max(size, 2**20) // 4)

    def __call__(self, *_: object) -> None:
        """Write the whole buffer (arguments are ignored: usable as a ``before`` hook)."""
        self._buffer.add_(1.0)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``; restore the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
