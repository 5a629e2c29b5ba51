"""What one reconfiguration of a sharded replica did: `ReconfigurationReport` and its parts.

Built by `ShardedDriver.reconfigure` from the plan (`reconfig.ReconfigurationPlan`) and what every
shard reported back (`messages.MigrationStats`): the transfers with their times, per-stage
readiness (which transfer each new stage waited for and when it was built) and the bytes each
worker really held at its peak next to the plan's peak and the bound.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from elastic_llm.engine.replica.messages import MigrationStats
from elastic_llm.engine.replica.reconfig import ReconfigurationPlan, WorkerAssignment
from elastic_llm.planning.config import ParallelConfig
from elastic_llm.planning.migration import Transfer
from elastic_llm.planning.slices import Slice


@dataclass(frozen=True)
class TransferRecord:
    """One slice moved in a reconfiguration."""

    #: sending worker, or (see `peer`) a shard of another replica; None: read from the checkpoint
    #: (also when the plan named a peer that could not serve it)
    src: str | None
    dst: str  #: receiving worker
    slice: Slice  #: what moved (planning core's slice: layer, part, unit range, KV tokens)
    nbytes: int  #: bytes
    seconds: float  #: time the receiver spent on it (receive, pull or checkpoint read)
    peer: bool = False  #: `src` is a shard of another live replica (pulled from it)


@dataclass(frozen=True)
class StageReady:
    """When one new pipeline stage held everything it needs and was built (released to compute)."""

    stage: int  #: new stage
    after: int  #: index of the transfer its ranks were built after (-1: before the first)
    planned_after: int  #: the plan's index of the stage's last incoming transfer (-1: none)
    seconds: float  #: seconds after the migration began when its last rank was built
    later_transfers: int  #: transfers of the plan that came after it was built (0: not early)


@dataclass(frozen=True)
class ReconfigurationReport:
    """What one reconfiguration (or the start, from the checkpoint) did."""

    old: ParallelConfig | None  #: configuration before (None at the start)
    new: ParallelConfig  #: configuration after
    epoch: int  #: process-group epoch now running
    assignments: tuple[WorkerAssignment, ...]  #: every worker's old and new position
    transfers: tuple[TransferRecord, ...]  #: in execution order
    kv_requests: int  #: requests whose KV was carried over
    received_bytes: int  #: bytes the workers actually received or read (equals `moved_bytes`)
    started_workers: tuple[str, ...]  #: processes started for it
    stopped_workers: tuple[str, ...]  #: processes stopped after it
    spawn_seconds: float  #: starting new processes
    plan_seconds: float  #: mapping and migration planning
    group_seconds: float  #: forming the process groups (all epochs)
    migrate_seconds: float  #: transfers and rebuilding networks and KV
    seconds: float  #: all of it, wall clock
    #: per new stage in stage order: when it was built (see `StageReady`)
    stage_ready: tuple[StageReady, ...] = ()
    #: {worker: most bytes of weights + KV it really held during the migration} (measured)
    peak_bytes: Mapping[str, int] = field(default_factory=dict)
    #: {worker: the plan's peak bytes} (weights + valid KV tokens, as the planner counts them)
    planned_peak_bytes: Mapping[str, int] = field(default_factory=dict)
    #: {worker: bytes held before / after the migration} (measured like `peak_bytes`)
    start_bytes: Mapping[str, int] = field(default_factory=dict)
    end_bytes: Mapping[str, int] = field(default_factory=dict)
    memory_bytes: Mapping[str, int] = field(default_factory=dict)  #: {worker: bound} where one was set
    progressive: bool = True  #: releases and early stage builds were carried out
    use_mapper: bool = True  #: Kuhn-Munkres placed the workers (else the given order)

    @property
    def weight_bytes(self) -> int:
        """Weight bytes sent worker to worker within the replica."""
        return sum(t.nbytes for t in self.transfers
                   if t.src is not None and not t.peer and not t.slice.is_kv)

    @property
    def peer_bytes(self) -> int:
        """Weight bytes pulled from shards of other live replicas."""
        return sum(t.nbytes for t in self.transfers if t.peer)

    @property
    def checkpoint_bytes(self) -> int:
        """Weight bytes read from the checkpoint (slices no live worker held)."""
        return sum(t.nbytes for t in self.transfers if t.src is None)

    @property
    def kv_bytes(self) -> int:
        """KV bytes sent worker to worker."""
        return sum(t.nbytes for t in self.transfers if t.slice.is_kv)

    @property
    def moved_bytes(self) -> int:
        """Everything that reached a worker that lacked it."""
        return sum(t.nbytes for t in self.transfers)

    def summary(self) -> dict[str, object]:
        """Plain values for a message (what `ReplicaActor.reshard` returns, among others)."""
        return {"old": list(self.old.shape) if self.old else None, "new": list(self.new.shape),
                "epoch": self.epoch, "kv_requests": self.kv_requests, "kv_bytes": self.kv_bytes,
                "weight_bytes": self.weight_bytes, "checkpoint_bytes": self.checkpoint_bytes,
                "peer_bytes": self.peer_bytes, "seconds": self.seconds, "peak_bytes": dict(self.peak_bytes),
                "planned_peak_bytes": dict(self.planned_peak_bytes),
                "memory_bytes": dict(self.memory_bytes), "progressive": self.progressive,
                "use_mapper": self.use_mapper,
                "stage_ready": [[s.stage, s.after, s.seconds, s.later_transfers]
                                for s in self.stage_ready]}


def transfer_records(transfers: Sequence[Transfer], stats: Sequence[MigrationStats],
                     peers: Collection[str] = ()) -> tuple[TransferRecord, ...]:
    """The plan's transfers with the receivers' times; `peers`: names of other replicas' shards
    (a transfer from one that fell back to the checkpoint is recorded with ``src=None``)."""
    seconds = {index: s for st in stats for index, s in st.transfer_seconds}
    fallbacks = {index for st in stats for index in st.peer_fallbacks}
    out = []
    for i, t in enumerate(transfers):
        src = None if i in fallbacks else t.src
        out.append(TransferRecord(src, t.dst, t.slice, t.nbytes, seconds.get(i, 0.0),
                                  src is not None and src in peers))
    return tuple(out)


def stage_ready(plan: ReconfigurationPlan, stats: Sequence[MigrationStats],
                began: float) -> tuple[StageReady, ...]:
    """Per new stage: the transfer its ranks were built after and when the last one was
    (`began`: the wall clock when the migration was dispatched)."""
    by_worker = {s.worker: s for s in stats}
    ranks = plan.placement.config.M
    out = []
    for ready in plan.readiness:
        names = plan.placement.workers[ready.stage * ranks:(ready.stage + 1) * ranks]
        after = max(by_worker[n].built_after for n in names)  # type: ignore[type-var]
        seconds = max(by_worker[n].ready_time for n in names) - began
        out.append(StageReady(ready.stage, after, ready.after, max(0.0, seconds),
                              len(plan.transfers) - 1 - after))
    return tuple(out)
