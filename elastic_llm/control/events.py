"""What happens to the fleet: the events `FleetState.handle` takes.

The Dask enactor turns scheduler membership, client handlers, replica commits and the results of
the instructions it carried out into these; the simulator makes the same ones from traces. Each
result event names the operation (`op`) it answers: an answer to an operation the state machine
no longer waits for (it timed out, or its replica is gone) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_llm.control.fleet import UNBOUNDED_MEMORY
from elastic_llm.control.messages import MovedRequest, ReplicaCommit, ReplicaInfo, ReshardSummary
from elastic_llm.sampling import SamplingParams


@dataclass(frozen=True)
class WorkerJoined:
    """A worker (one instance) joined the fleet."""

    address: str  #: its address
    market: str = "on-demand"  #: "spot", "on-demand" or "unknown"
    price_per_hour: float = 0.0  #: USD per hour
    memory_bytes: int = UNBOUNDED_MEMORY  #: bytes of weights + KV it may hold


@dataclass(frozen=True)
class WorkerLost:
    """A worker is gone (with or without notice)."""

    address: str  #: its address


@dataclass(frozen=True)
class WorkerNoticed:
    """A worker will be preempted at `deadline`."""

    address: str  #: its address
    deadline: float  #: when it disappears (same clock as `now`)


@dataclass(frozen=True)
class RequestSubmitted:
    """A client submitted a request (validated by the client)."""

    request_id: str  #: unique id
    client: str  #: the submitting client
    prompt_token_ids: tuple[int, ...]  #: its prompt
    params: SamplingParams  #: how to sample


@dataclass(frozen=True)
class RequestsCancelled:
    """A client aborted these requests."""

    request_ids: tuple[str, ...]  #: the requests


@dataclass(frozen=True)
class ClientGone:
    """A client disconnected: its unfinished requests are aborted unless it is back within
    `FleetConfig.client_reconnect_s`."""

    client: str  #: the client


@dataclass(frozen=True)
class ClientBack:
    """A disconnected client called again (it reconnected): its requests carry on."""

    client: str  #: the client


@dataclass(frozen=True)
class TokensCommitted:
    """A replica's commit of one iteration."""

    commit: ReplicaCommit  #: the message
    #: the worker whose stream carried it (it must be the replica's leader); None: a trusted
    #: in-process source (the simulator)
    origin: str | None = None


@dataclass(frozen=True)
class ModelDescribed:
    """The served model's spec, read on a worker (needed to plan sharded shapes)."""

    op: int  #: the `DescribeModel` operation
    spec: object  #: `elastic_llm.model.spec.ModelSpec`


@dataclass(frozen=True)
class ReplicaCreated:
    """A replica started without building its engine (`StartReplica(build=False)`)."""

    op: int  #: the `StartReplica` operation


@dataclass(frozen=True)
class ReplicaReady:
    """A replica's engine is built and takes requests."""

    op: int  #: the `StartReplica`, `BuildReplica` or `ReloadReplica` operation
    info: ReplicaInfo  #: what it reports


@dataclass(frozen=True)
class ReplicaStopped:
    """A `RetireReplica` finished: the replica's workers are free."""

    op: int  #: the operation


@dataclass(frozen=True)
class RequestsAssigned:
    """A replica took the requests of an `AssignRequests`."""

    op: int  #: the operation


@dataclass(frozen=True)
class TransferDone:
    """A `MigrateRequests` or `HandOver` finished: these requests moved (with their KV)."""

    op: int  #: the operation
    moved: tuple[MovedRequest, ...]  #: requests that moved


@dataclass(frozen=True)
class ReshardDone:
    """A `Reshard` finished."""

    op: int  #: the operation
    summary: ReshardSummary  #: what it did


@dataclass(frozen=True)
class OperationFailed:
    """An operation failed (its actor call raised, or its worker died)."""

    op: int  #: the operation
    error: str  #: why


@dataclass(frozen=True)
class Tick:
    """Time passed: timers, deadlines and the load measurement are checked."""


Event = (WorkerJoined | WorkerLost | WorkerNoticed | RequestSubmitted | RequestsCancelled | ClientGone | ClientBack
         | TokensCommitted | ModelDescribed | ReplicaCreated | ReplicaReady | ReplicaStopped | RequestsAssigned
         | TransferDone | ReshardDone | OperationFailed | Tick)
