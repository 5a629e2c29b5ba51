"""What the fleet should do: the instructions `FleetState.handle` returns.

The Dask enactor carries each out with actor calls and reports the result back as an event naming
the instruction's `op`; the simulator times them with the cost model. An instruction with a
`deadline` that has not reported back by then is taken as failed by the state machine itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_llm.control.messages import RequestWork


@dataclass(frozen=True)
class DescribeModel:
    """Read the served model's spec on a worker; answer `ModelDescribed`."""

    op: int
    deadline: float


@dataclass(frozen=True)
class StartReplica:
    """Create a replica on `leader` (sharded over `shards` when given); answer `ReplicaReady`
    (or `ReplicaCreated` when `build` is False: the engine is built on a later `BuildReplica`)."""

    op: int
    replica_id: str  #: the new replica's id
    leader: str  #: the worker holding its engine
    shards: tuple[str, ...]  #: shard workers (empty: a whole-model replica)
    parallel: tuple[int, int]  #: its (P, M)
    weights_from: str | None  #: a ready replica that sends its weights (None: the checkpoint)
    build: bool  #: build the engine at once
    deadline: float


@dataclass(frozen=True)
class BuildReplica:
    """Build a replica created with `build=False`; answer `ReplicaReady`."""

    op: int
    replica_id: str
    deadline: float


@dataclass(frozen=True)
class ReloadReplica:
    """Drop every request of the replica and load its weights again from the checkpoint
    (reparallelize); answer `ReplicaReady`."""

    op: int
    replica_id: str
    deadline: float


@dataclass(frozen=True)
class AssignRequests:
    """Hand requests to a ready replica; answer `RequestsAssigned`."""

    op: int
    replica_id: str
    requests: tuple[RequestWork, ...]
    deadline: float


@dataclass(frozen=True)
class CancelRequests:
    """Abort these requests on the replica, if it holds them (fire and forget)."""

    replica_id: str
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class MigrateRequests:
    """At its next token boundary `source` pauses these requests; `target` takes them WITH their
    KV, worker to worker; answer `TransferDone`."""

    op: int
    source: str  #: replica id
    target: str  #: replica id
    request_ids: tuple[str, ...]
    deadline: float
    #: when the source's worker goes (its notice's deadline): a pull cannot succeed after it,
    #: so the target gives up then (plus `PULL_GRACE_S`) rather than at `deadline`
    source_deadline: float


PULL_GRACE_S = 2.0  #: how long past its source's deadline a pull still waits (clock skew, last bytes)


@dataclass(frozen=True)
class HandOver:
    """`source` pauses these requests and pushes them WITH their KV to `successor` (created with
    `build=False`); answer `TransferDone`."""

    op: int
    source: str
    successor: str
    request_ids: tuple[str, ...]
    deadline: float


@dataclass(frozen=True)
class Reshard:
    """Switch a sharded replica at a token boundary to `parallel` on `workers`, KV kept; answer
    `ReshardDone`. `use_mapper` and `progressive` are SpotServe's device mapper and migration
    planner (off in its ablations)."""

    op: int
    replica_id: str
    parallel: tuple[int, int]
    workers: tuple[str, ...]
    use_mapper: bool
    progressive: bool
    deadline: float


@dataclass(frozen=True)
class StopReplica:
    """Stop a lost replica, whatever is left of it (fire and forget)."""

    replica_id: str


@dataclass(frozen=True)
class RetireReplica:
    """Stop the replica and answer `ReplicaStopped` once its workers are free for another one
    (its shards have left their process groups)."""

    op: int
    replica_id: str
    deadline: float


@dataclass(frozen=True)
class RestartWorkers:
    """Fence these workers: restart their processes (through their nannies), so that whatever a
    broken replica left there (shards, process groups) is gone; they rejoin as new workers. A
    worker that cannot be restarted stays out of use (fire and forget)."""

    workers: tuple[str, ...]


@dataclass(frozen=True)
class NotifyClients:
    """These clients have new events in the request table."""

    clients: tuple[str, ...]


@dataclass(frozen=True)
class WakeAt:
    """Send a `Tick` at (or soon after) `time`."""

    time: float


@dataclass(frozen=True)
class AcquireCapacity:
    """Ask for `count` more instances on `market` (the fleet cannot serve with what it has)."""

    count: int
    market: str


@dataclass(frozen=True)
class ReleaseCapacity:
    """Give back the instance `worker` (no longer needed)."""

    worker: str


Instruction = (DescribeModel | StartReplica | BuildReplica | ReloadReplica | AssignRequests | CancelRequests
               | MigrateRequests | HandOver | Reshard | StopReplica | RetireReplica | RestartWorkers
               | NotifyClients | WakeAt
               | AcquireCapacity | ReleaseCapacity)
