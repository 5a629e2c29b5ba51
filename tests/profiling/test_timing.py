"""Timing helpers: round-robin order, warm-up, hooks, cache size."""

from __future__ import annotations

import pytest

from elastic_llm.profiling.timing import (
    CacheFlusher,
    interleaved_medians,
    last_level_cache_bytes,
    median_seconds,
)


def test_calls_are_timed_round_robin_after_warm_up_rounds() -> None:
    order: list[str] = []
    calls = {key: (lambda key=key: order.append(key)) for key in ("a", "b", "c")}
    hooked: list[str] = []
    medians = interleaved_medians(calls, repeats=3, warmup=2, before=hooked.append)
    assert order == ["a", "b", "c"] * 5  # 2 warm-up rounds + 3 timed rounds, interleaved
    assert hooked == order  # the hook runs before every call, with its key
    assert set(medians) == {"a", "b", "c"} and all(v >= 0 for v in medians.values())


def test_median_ignores_warm_up_and_outliers() -> None:
    import time

    durations = iter([0.2, 0.001, 0.001, 0.05])  # warm-up 0.2 s, then one outlier of 3

    def call() -> None:
        time.sleep(next(durations))

    assert median_seconds(call, repeats=3, warmup=1) < 0.02
    with pytest.raises(ValueError):
        median_seconds(call, repeats=0)


def test_cache_flusher_writes_a_buffer_larger_than_the_cache() -> None:
    assert last_level_cache_bytes() >= 2**16
    flusher = CacheFlusher(nbytes=2**20)
    flusher("any key")
    flusher()
    assert float(flusher._buffer[0]) == 2.0  # every call wrote the buffer
