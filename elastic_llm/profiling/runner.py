"""`profile_model`: time a model's layer shards, head and communication into a `ProfileResult`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from elastic_llm.model.layers import TensorShard
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.planning.profiles import Phase
from elastic_llm.profiling.comm import CommJob, GroupTimes, measure_group
from elastic_llm.profiling.compute import (
    Checkpoint,
    forward_call,
    head_network,
    layer_network,
    open_checkpoint,
    rank_shard,
)
from elastic_llm.profiling.machine import describe_machine
from elastic_llm.profiling.result import PhaseRow, PhaseTable, ProfileResult
from elastic_llm.profiling.settings import ProfileSettings
from elastic_llm.profiling.timing import (
    CacheFlusher,
    interleaved_medians,
    median_seconds,
    torch_threads,
)

Progress = Callable[[str], None]


@dataclass
class _Counter:
    """Numbers progress lines as ``[i/total]``."""

    total: int
    report: Progress
    done: int = field(default=0)

    def __call__(self, text: str) -> None:
        self.done += 1
        self.report(f"[profile {self.done}/{self.total}] {text}")


def profile_model(model: str | os.PathLike[str], settings: ProfileSettings | None = None,
                  progress: Progress | None = None) -> ProfileResult:
    """Measure ``model`` (embedded name, checkpoint directory or .gguf) under ``settings``.

    Each measurement reports one progress line through ``progress`` (default: none).

    Raises:
        ProfilingError: settings the model cannot be profiled with.
        CommProfilingError: a communication worker failed or timed out.
        ModelLoadError: the checkpoint cannot be found or read.
    """
    dtype = torch.float32
    checkpoint = open_checkpoint(model, dtype)
    settings = (settings or ProfileSettings()).for_model(checkpoint.spec)
    groups = _comm_groups(settings)
    step = _Counter(2 * len(Phase) * len(settings.degrees) + len(groups),
                    progress or (lambda _: None))
    machine = describe_machine(settings.threads, dtype)
    with torch_threads(settings.threads):
        compute = _time_per_degree(
            checkpoint, settings, step,
            lambda shard: layer_network(checkpoint, settings.layer, shard, dtype), _describe_layer)
        head = _time_per_degree(
            checkpoint, settings, step, lambda shard: head_network(checkpoint, shard, dtype),
            _describe_head(checkpoint.spec.vocab_size))
    all_reduce: dict[Phase, dict[int, dict[int, float]]] = {ph: {} for ph in Phase}
    stage_hop: dict[Phase, dict[int, float]] = {}
    for world in groups:
        times = _time_group(checkpoint, settings, world, step)
        for ph in Phase:
            all_reduce[ph][world] = {b: times.all_reduce[_rows(settings, ph, b)]
                                     for b in settings.batch_sizes}
        if times.hop:
            stage_hop = {ph: {b: times.hop[_rows(settings, ph, b)] for b in settings.batch_sizes}
                         for ph in Phase}
    bandwidth, source = _bandwidth(checkpoint, settings, stage_hop)
    memory = max(1, machine.memory_bytes // max(1, machine.logical_cpus))
    return ProfileResult(
        model_name=checkpoint.spec.name, settings=settings, machine=machine, compute=compute,
        head=head, all_reduce=all_reduce if groups else {}, stage_hop=stage_hop,
        network_bandwidth=bandwidth, bandwidth_source=source, device_memory_bytes=memory,
        memory_source=f"physical memory / {machine.logical_cpus} logical CPUs "
                      "(one worker per CPU); not measured")


def _rows(settings: ProfileSettings, phase: Phase, batch: int) -> int:
    """Rows of the hidden-state tensor of a micro-batch of ``batch`` requests in ``phase``."""
    return batch * settings.prefill_len if phase is Phase.PREFILL else batch


def _shape(settings: ProfileSettings, phase: Phase) -> tuple[int, int]:
    """(new tokens, cached tokens) per request in ``phase``."""
    return (settings.prefill_len, 0) if phase is Phase.PREFILL else (1, settings.context_len)


def _time_per_degree(checkpoint: Checkpoint, settings: ProfileSettings, step: Progress,
                     build: Callable[[TensorShard], LlamaNetwork],
                     describe: Callable[[TensorShard], str]) -> PhaseTable:
    """``build(rank 0's shard)`` timed for every degree, phase and micro-batch size."""
    table: dict[Phase, dict[int, dict[int, float]]] = {ph: {} for ph in Phase}
    for degree in settings.degrees:
        shard = rank_shard(checkpoint.spec, degree)
        label = f"M={degree} {describe(shard)}"
        for ph, row in _time_network(build(shard), settings, label, step).items():
            table[ph][degree] = row
    return table


def _describe_layer(shard: TensorShard) -> str:
    return (f"layer ({shard.num_heads} heads, {shard.num_kv_heads} KV heads, "
            f"MLP {shard.intermediate[1] - shard.intermediate[0]})")


def _describe_head(vocab_size: int) -> Callable[[TensorShard], str]:
    def describe(shard: TensorShard) -> str:
        start, stop = shard.vocab_rows(vocab_size)
        return f"embedding + head ({stop - start} vocabulary rows)"
    return describe


def _time_network(network: LlamaNetwork, settings: ProfileSettings, label: str,
                  step: Progress) -> dict[Phase, dict[int, float]]:
    """Median forward seconds per phase and micro-batch size, batch sizes timed round-robin, each
    call after a cache flush unless ``settings.flush_cache`` is off."""
    out = {}
    flush = CacheFlusher() if settings.flush_cache else None
    for ph in Phase:
        new, cached = _shape(settings, ph)
        calls = {b: forward_call(network, b, new, cached) for b in settings.batch_sizes}
        out[ph] = interleaved_medians(calls, settings.repeats, settings.warmup, before=flush)
        step(f"{label} {ph.value}: " + ", ".join(f"b={b} {s * 1e3:.3f} ms"
                                                  for b, s in out[ph].items()))
    return out


def _comm_groups(settings: ProfileSettings) -> tuple[int, ...]:
    """Group sizes to spawn: 2..max degree (2 at least, for the stage hop); none without comm."""
    if not settings.measure_comm:
        return ()
    return tuple(range(2, max(2, max(settings.degrees)) + 1))


def _time_group(checkpoint: Checkpoint, settings: ProfileSettings, world: int,
                step: Progress) -> GroupTimes:
    rows = tuple(sorted({_rows(settings, ph, b) for ph in Phase for b in settings.batch_sizes}))
    times = measure_group(CommJob(world=world, rows=rows, hidden=checkpoint.spec.hidden_size,
                                  hop=world == 2, repeats=settings.comm_repeats,
                                  warmup=settings.warmup, threads=settings.threads,
                                  timeout=settings.comm_timeout))
    hop = f", stage hop {_span(times.hop)}" if times.hop else ""
    step(f"gloo group of {world}: all-reduce {_span(times.all_reduce)} over {rows[0]}-{rows[-1]} "
         f"rows{hop}")
    return times


def _span(times: Mapping[int, float]) -> str:
    return f"{min(times.values()) * 1e3:.3f}-{max(times.values()) * 1e3:.3f} ms"


def _bandwidth(checkpoint: Checkpoint, settings: ProfileSettings,
               stage_hop: PhaseRow) -> tuple[float, str]:
    """Bytes/s between workers: from the largest stage hop measured, else from an in-process
    copy of the same tensor (a lower bound on nothing, but measured on this machine)."""
    rows = _rows(settings, Phase.PREFILL, max(settings.batch_sizes))
    nbytes = rows * checkpoint.spec.hidden_size * 4
    if stage_hop:
        seconds = stage_hop[Phase.PREFILL][max(settings.batch_sizes)]
        return nbytes / seconds, f"largest stage hop ({nbytes / 1e6:.2f} MB, gloo on loopback)"
    source = torch.zeros(nbytes // 4)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), settings.repeats, settings.warmup)
    return nbytes / seconds, (f"in-process copy of {nbytes / 1e6:.2f} MB "
                              "(communication not measured)")
