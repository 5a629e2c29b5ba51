"""The fleet as the control state machine sees it: workers, replicas, notices handled, loop counters.

Plain mutable records owned by `FleetState` (only its transition changes them); everything that
leaves the state machine is a frozen instruction or a status dict. Pure: no dask, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from elastic_llm.control.messages import LoopCounters, SchedulingCounters

#: "No memory budget" (the same sentinel as `elastic_llm.planning.config.Worker.memory_bytes`).
UNBOUNDED_MEMORY = 1 << 62


class WorkerHealth(str, enum.Enum):
    """Whether a worker may take a new position."""

    UP = "up"  #: usable
    LEAVING = "leaving"  #: it announced its preemption: nothing new goes there
    SUSPECT = "suspect"  #: a replica on it broke: its shards may linger, nothing new goes there


@dataclass
class WorkerRecord:
    """One worker (one instance) of the fleet."""

    address: str  #: the Dask worker address
    market: str = "on-demand"  #: "spot" or "on-demand" (or "unknown")
    price_per_hour: float = 0.0  #: USD per hour while held
    memory_bytes: int = UNBOUNDED_MEMORY  #: bytes of weights + KV it may hold
    joined_at: float = 0.0  #: when it joined
    health: WorkerHealth = WorkerHealth.UP
    deadline: float | None = None  #: when it disappears, once noticed


class ReplicaState(str, enum.Enum):
    """Life of a replica."""

    STARTING = "starting"  #: being created or built
    READY = "ready"  #: takes requests
    SWITCHING = "switching"  #: its shape or workers change (a reshard): no new requests meanwhile
    DRAINING = "draining"  #: its leader got a notice (or it is dissolved): no new requests
    STOPPING = "stopping"  #: being stopped; its workers are free once that is confirmed
    LOST = "lost"  #: gone


@dataclass
class ReplicaRecord:
    """The controller's view of one replica."""

    replica_id: str
    leader: str  #: the worker holding its engine (and, sharded, one of its shards)
    shards: tuple[str, ...] = ()  #: a sharded replica's shard workers (the leader among them)
    parallel: tuple[int, int] = (1, 1)  #: its (P, M)
    state: ReplicaState = ReplicaState.STARTING
    epoch: int = 0  #: configuration epoch: +1 at every reshard
    created_at: float = 0.0  #: when the controller asked for it
    start_seconds: float | None = None  #: from creation to ready
    heard_at: float = 0.0  #: its latest commit or answer to an operation (`control.liveness`)
    kv_bytes_per_token: int = 0  #: reported once ready
    weights: str = ""  #: "checkpoint" or "peer", once ready
    weights_from: str | None = None  #: the ready replica it takes its weights from while it starts
    noticed: bool = False  #: its leader got a notice: it is being evacuated or replaced
    successor_of: str | None = None  #: the noticed replica this one replaces, until it builds
    busy: int | None = None  #: the operation changing its shape or workers now (one at a time)
    reserved: tuple[str, ...] = ()  #: free workers that operation is about to add to it
    #: notices of its shard workers that arrived while `busy`: (worker, deadline), handled after
    deferred_notices: list[tuple[str, float]] = field(default_factory=list)

    @property
    def workers(self) -> tuple[str, ...]:
        """Every worker this replica holds something on."""
        return (self.leader, *(w for w in self.shards if w != self.leader))

    @property
    def sharded(self) -> bool:
        """Whether it runs over shard workers."""
        return bool(self.shards)


@dataclass(frozen=True)
class NoticeRecord:
    """A preemption notice as the controller handled it."""

    worker: str  #: the worker to be preempted
    deadline: float  #: when it disappears
    received: float  #: when the notice arrived
    migrated: int = 0  #: requests whose KV moved to another replica
    recomputed: int = 0  #: requests that recompute (KV could not move in time)


class LoopStats:
    """The latest loop counters of every replica (sent with each commit)."""

    def __init__(self) -> None:
        self._counters: dict[str, LoopCounters] = {}

    def record(self, replica: str, counters: LoopCounters) -> None:
        """Adopt the counters of one commit."""
        self._counters[replica] = counters

    def of(self, replica: str) -> LoopCounters:
        """The replica's latest counters (zeros before its first commit)."""
        return self._counters.get(replica, LoopCounters())

    def total(self, name: str) -> float:
        """A counter summed over every replica that ever reported."""
        return sum(getattr(c, name) for c in self._counters.values())

    def scheduling_total(self) -> SchedulingCounters:
        """Preemptions and swaps summed over every replica that ever reported."""
        total = SchedulingCounters()
        for counters in self._counters.values():
            total = total.plus(counters.scheduling)
        return total

    def overhead(self) -> float:
        """Replica loop time outside `step()` (commands, commits) per second inside it."""
        busy = self.total("busy_s")
        return self.total("overhead_s") / busy if busy > 0 else 0.0

    def step_seconds(self, replica: str, default: float = 0.05) -> float:
        """Mean iteration time the replica reported (`default` before it reported any)."""
        return self.of(replica).step_seconds or default
