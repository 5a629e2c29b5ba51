"""Engine counters: what ran, what was preempted, and what KV moved where."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_llm.engine.executor import StepWork


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's counters since it started."""

    iterations: int  #: forward passes run
    tokens_computed: int  #: tokens whose KV was computed (prefill, decode and recompute)
    preemptions: int  #: times a request that ran in one iteration was left out of the next
    tokens_dropped: int  #: cached tokens discarded by recompute-mode eviction (computed again)
    peak_device_kv_bytes: int  #: most valid KV bytes resident on the device after an iteration
    bytes_swapped_out: int  #: KV bytes copied device -> host
    bytes_swapped_in: int  #: KV bytes copied host -> device (blocking and prefetched)
    swap_seconds: float  #: time the engine loop spent blocked on swap copies
    prefix_tokens_reused: int = 0  #: prompt tokens whose KV was copied from the prefix cache
    prefills_deferred: int = 0  #: prompts that waited an iteration to copy a prefix another computed


class EngineCounters:
    """Mutable counters the engine updates every iteration."""

    def __init__(self) -> None:
        self.iterations = 0
        self.tokens_computed = 0
        self.preemptions = 0
        self.tokens_dropped = 0
        self.peak_device_kv_bytes = 0
        self.prefix_tokens_reused = 0
        self.prefills_deferred = 0

    def record_iteration(self, works: Sequence[StepWork], preempted: int, device_kv_bytes: int) -> None:
        """Count one executed iteration."""
        self.iterations += 1
        self.tokens_computed += sum(len(w.token_ids) for w in works)
        self.preemptions += preempted
        self.peak_device_kv_bytes = max(self.peak_device_kv_bytes, device_kv_bytes)

    def snapshot(self, executor: object) -> EngineStats:
        """Freeze the counters, with the executor's swap figures where it has them."""
        return EngineStats(
            iterations=self.iterations,
            tokens_computed=self.tokens_computed,
            preemptions=self.preemptions,
            tokens_dropped=self.tokens_dropped,
            peak_device_kv_bytes=self.peak_device_kv_bytes,
            bytes_swapped_out=getattr(executor, "bytes_swapped_out", 0),
            bytes_swapped_in=getattr(executor, "bytes_swapped_in", 0),
            swap_seconds=getattr(executor, "swap_seconds", 0.0),
            prefix_tokens_reused=self.prefix_tokens_reused,
            prefills_deferred=self.prefills_deferred,
        )
