"""The controller's bookkeeping of replicas: their states, handles, notices handled, the loop
counters they report."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from elastic_llm.cluster.contracts import SchedulingCounters


class ReplicaState(str, enum.Enum):
    """Life of a replica."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  #: its worker got a preemption notice: no new requests
    LOST = "lost"


@dataclass
class ReplicaHandle:
    """The controller's view of one replica."""

    replica_id: str
    worker: str
    state: ReplicaState = ReplicaState.STARTING
    actor: Any = None
    future: Any = None  # keeps the actor alive
    kv_bytes_per_token: int = 0  #: reported by the replica once ready
    started_at: float = field(default_factory=time.time)
    shards: tuple[str, ...] = ()  #: a sharded replica's shard workers (the leader `worker` among them)
    parallel: tuple[int, int] = (1, 1)  #: its (P, M) now
    noticed: bool = False  #: its leader got a preemption notice: it is being evacuated or replaced
    weights: str = ""  #: where its weights came from once ready: "checkpoint" or "peer"
    start_seconds: float | None = None  #: from its creation to ready (weights loaded, engine built)
    #: held while its shape or workers change (growth, reshard, leader handover): one at a time
    switching: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def workers(self) -> tuple[str, ...]:
        """Every worker this replica holds something on."""
        return (self.worker, *(w for w in self.shards if w != self.worker))


@dataclass(frozen=True)
class NoticeRecord:
    """A preemption notice as the controller handled it."""

    worker: str  #: the worker to be preempted
    deadline: float  #: wall time it disappears
    received: float  #: wall time the notice arrived
    migrated: int = 0  #: requests whose KV moved to other replicas
    recomputed: int = 0  #: requests the arrangement sent to recompute (KV would not fit in time)


class LoopStats:
    """Cumulative loop counters each replica sends with its commits."""

    def __init__(self) -> None:
        # replica -> (iterations, seconds in step(), seconds outside it, iteration periods incl. pacing)
        self._counters: dict[str, tuple[int, float, float, float]] = {}
        self._prefix_reused: dict[str, int] = {}  # replica -> prompt tokens taken from its prefix cache
        self._scheduling: dict[str, SchedulingCounters] = {}  # replica -> its preemptions and KV swaps

    def record(self, replica: str, loop: Sequence[float]) -> None:
        """Adopt the counters of one commit message."""
        self._counters[replica] = (int(loop[0]), loop[1], loop[2], loop[3])
        self._prefix_reused[replica] = int(loop[4])

    def record_scheduling(self, replica: str, counters: dict[str, Any]) -> None:
        """Adopt the "scheduling" counters of one commit message (`SchedulingCounters.to_dict()`)."""
        self._scheduling[replica] = SchedulingCounters.from_dict(counters)

    def scheduling(self, replica_id: str) -> SchedulingCounters:
        """The replica's last reported preemptions and KV swaps (zeros before it reported any)."""
        return self._scheduling.get(replica_id, SchedulingCounters())

    def prefix_tokens_reused(self) -> int:
        """Prompt tokens the replicas took from their prefix caches instead of computing them."""
        return sum(self._prefix_reused.values())

    def overhead(self) -> float:
        """Replica loop time outside `step()` (commands, commits) per second inside it."""
        step = sum(counters[1] for counters in self._counters.values())
        extra = sum(counters[2] for counters in self._counters.values())
        return extra / step if step > 0 else 0.0

    def step_seconds(self, replica_id: str) -> float:
        """Mean decode-iteration time the replica reported (a default before it reported any)."""
        iterations, busy, _, period = self._counters.get(replica_id, (0, 0.0, 0.0, 0.0))
        measured = max(period, busy) / iterations if iterations else 0.0
        return measured if measured > 0 else 0.05

