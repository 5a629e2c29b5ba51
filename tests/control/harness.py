"""A hand-driven enactor for `FleetState` tests: events in, instructions collected, answers by hand."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from elastic_llm.control import FleetConfig, FleetState
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.messages import (
    FinishCommit,
    LoopCounters,
    MovedRequest,
    ReplicaCommit,
    ReplicaInfo,
    ReshardSummary,
    TokenCommit,
)
from elastic_llm.sampling import SamplingParams

T = TypeVar("T")


class Harness:
    """Feeds events to a `FleetState` at a hand-moved clock; keeps every instruction it returned."""

    def __init__(self, policy: str = "spotserve", config: FleetConfig | None = None, **kwargs: Any) -> None:
        self.fleet = FleetState(policy, config or FleetConfig(), **kwargs)
        self.now = 1000.0
        self.out: list[ins.Instruction] = []

    def send(self, event: ev.Event, at: float | None = None) -> list[ins.Instruction]:
        if at is not None:
            self.now = at
        got = self.fleet.handle(event, self.now)
        self.out.extend(got)
        return got

    def tick(self, at: float) -> list[ins.Instruction]:
        return self.send(ev.Tick(), at)

    def of(self, kind: type[T], since: int = 0) -> list[T]:
        return [i for i in self.out[since:] if isinstance(i, kind)]

    def last(self, kind: type[T]) -> T:
        return self.of(kind)[-1]

    # -- answers ---------------------------------------------------------------------------------
    def ready(self, start: ins.StartReplica | ins.BuildReplica | ins.ReloadReplica, kv_per_token: int = 1000,
              peer_bytes: int = 0) -> list[ins.Instruction]:
        replica = self.fleet.replicas[start.replica_id]
        info = ReplicaInfo(start.replica_id, replica.leader, kv_per_token, "peer" if peer_bytes else "checkpoint",
                           peer_bytes, replica.parallel, replica.shards)
        return self.send(ev.ReplicaReady(start.op, info))

    def join(self, *addresses: str, ready: bool = True, **info: Any) -> None:
        """Workers join; their whole-model replicas (if any) become ready."""
        for address in addresses:
            before = len(self.out)
            self.send(ev.WorkerJoined(address, **info))
            if ready:
                for start in self.of(ins.StartReplica, before):
                    self.ready(start)

    def submit(self, *request_ids: str, prompt: Iterable[int] = (1, 2, 3), new_tokens: int = 50) -> None:
        for request_id in request_ids:
            self.send(ev.RequestSubmitted(request_id, "client-1", tuple(prompt),
                                          SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))

    def commit(self, replica: str, tokens: dict[str, tuple[int, list[int]]],
               finished: dict[str, list[int]] | None = None, step_s: float = 0.05) -> list[ins.Instruction]:
        iterations = 10
        loop = LoopCounters(iterations, step_s * iterations, 0.0, step_s * iterations)
        commit = ReplicaCommit(replica, loop,
                               tuple(TokenCommit(r, s, tuple(t)) for r, (s, t) in tokens.items()),
                               tuple(FinishCommit(r, "length", "", tuple(t)) for r, t in (finished or {}).items()))
        return self.send(ev.TokensCommitted(commit))

    def moved(self, op: int, *request_ids: str, kv_bytes: int = 100) -> list[ins.Instruction]:
        return self.send(ev.TransferDone(op, tuple(MovedRequest(r, kv_bytes) for r in request_ids)))

    def resharded(self, reshard: ins.Reshard, old: tuple[int, int], kv_bytes: int = 100) -> list[ins.Instruction]:
        summary = ReshardSummary(old, reshard.parallel, 1, reshard.workers, 1, kv_bytes, 10, 0, 0.5)
        return self.send(ev.ReshardDone(reshard.op, summary))

    def owner(self, request_id: str) -> str | None:
        return self.fleet.table.get(request_id).replica

    def replica_on(self, worker: str) -> str:
        (replica,) = [r.replica_id for r in self.fleet.replicas.values() if r.leader == worker]
        return replica
