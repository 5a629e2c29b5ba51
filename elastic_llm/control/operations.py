"""Operations the state machine waits for, each with a deadline it owns.

An instruction that expects an answer (`StartReplica`, `MigrateRequests`, ...) opens an
`Operation`; the answering event closes it. An operation still open at its deadline is failed by
the state machine itself, and a late answer to a closed operation is ignored: every request an
operation carried goes back to the queue exactly once. Pure: times are parameters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

OperationKind = Literal["describe", "start", "build", "reload", "assign", "migrate", "handover", "reshard",
                        "retire"]


@dataclass
class Operation:
    """One instruction awaiting its answer."""

    op: int  #: its id (the instruction's and the answer's `op`)
    kind: OperationKind  #: what it does
    replica_id: str | None  #: the replica it is about (the target of a migration, the successor of a handover)
    deadline: float  #: when it is taken as failed
    source: str | None = None  #: migrate / handover: the replica the requests leave
    request_ids: tuple[str, ...] = ()  #: assign / migrate / handover: the requests it carries
    #: what the state machine needs when the answer comes (e.g. the notice a reshard answers)
    context: dict[str, Any] = field(default_factory=dict)

    def involves(self, replica_id: str) -> bool:
        """Whether `replica_id` takes part (as its replica or its source)."""
        return replica_id in (self.replica_id, self.source)


class Operations:
    """The open operations."""

    def __init__(self) -> None:
        self._open: dict[int, Operation] = {}
        self._ids = itertools.count()

    def open(self, kind: OperationKind, replica_id: str | None, deadline: float, **fields: Any) -> Operation:
        """Open an operation; returns it (its `op` goes into the instruction)."""
        operation = Operation(next(self._ids), kind, replica_id, deadline, **fields)
        self._open[operation.op] = operation
        return operation

    def get(self, op: int) -> Operation | None:
        """The open operation `op` (None if it is not open)."""
        return self._open.get(op)

    def close(self, op: int) -> Operation | None:
        """Close `op`; None if it is not open (already answered, failed or timed out)."""
        return self._open.pop(op, None)

    def expired(self, now: float) -> list[Operation]:
        """Open operations past their deadline (not closed: the caller fails them)."""
        return [o for o in self._open.values() if o.deadline <= now]

    def involving(self, replica_id: str) -> list[Operation]:
        """Open operations `replica_id` takes part in."""
        return [o for o in self._open.values() if o.involves(replica_id)]

    def of_kind(self, kind: OperationKind) -> list[Operation]:
        """Open operations of one kind."""
        return [o for o in self._open.values() if o.kind == kind]

    def __len__(self) -> int:
        return len(self._open)
