"""Typed messages on the wire between replicas and the controller.

Every message a replica sends (a commit per iteration, its description once ready, what a
migration moved, what a reshard did) is a frozen dataclass here, with `to_wire` (msgpack-friendly
plain data) and `from_wire` (its inverse, validating). Pure stdlib: the replica actor (cluster
layer) builds them, the control state machine reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from elastic_llm.sampling import SamplingParams


@dataclass(frozen=True)
class SchedulingCounters:
    """A replica's preemptive-scheduling and KV-residency counters (cumulative over every engine
    it has built)."""

    preemptions: int = 0  #: times a request that ran in one iteration was left out of the next
    bytes_swapped_out: int = 0  #: KV bytes copied device -> host (swap mode)
    bytes_swapped_in: int = 0  #: KV bytes copied host -> device (blocking and prefetched)
    swap_seconds: float = 0.0  #: seconds the replica's loop spent blocked on swap copies
    tokens_dropped: int = 0  #: cached tokens discarded by recompute-mode eviction (computed again)

    def plus(self, other: SchedulingCounters) -> SchedulingCounters:
        """Field-wise sum (counters of an earlier engine plus the current one's)."""
        return SchedulingCounters(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack-friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulingCounters:
        """Inverse of `to_dict`; unknown keys are ignored, missing ones read as 0."""
        return cls(preemptions=int(data.get("preemptions", 0)),
                   bytes_swapped_out=int(data.get("bytes_swapped_out", 0)),
                   bytes_swapped_in=int(data.get("bytes_swapped_in", 0)),
                   swap_seconds=float(data.get("swap_seconds", 0.0)),
                   tokens_dropped=int(data.get("tokens_dropped", 0)))


@dataclass(frozen=True)
class LoopCounters:
    """Cumulative counters of one replica's loop, sent with each commit."""

    iterations: int = 0  #: engine iterations so far
    busy_s: float = 0.0  #: seconds inside `engine.step()`
    overhead_s: float = 0.0  #: seconds of the loop's own work while serving (commands, commits)
    period_s: float = 0.0  #: seconds of iterations as long as they really took, pacing included
    prefix_tokens_reused: int = 0  #: prompt tokens taken from the replica's prefix caches
    scheduling: SchedulingCounters = field(default_factory=SchedulingCounters)  #: preemptions, swaps

    @property
    def step_seconds(self) -> float:
        """Mean iteration time (0.0 before any iteration)."""
        if not self.iterations:
            return 0.0
        return max(self.period_s, self.busy_s) / self.iterations

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-friendly form."""
        return {"iterations": self.iterations, "busy_s": self.busy_s, "overhead_s": self.overhead_s,
                "period_s": self.period_s, "prefix_tokens_reused": self.prefix_tokens_reused,
                "scheduling": self.scheduling.to_dict()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoopCounters:
        """Inverse of `to_wire`."""
        return cls(int(data["iterations"]), float(data["busy_s"]), float(data["overhead_s"]),
                   float(data["period_s"]), int(data["prefix_tokens_reused"]),
                   SchedulingCounters.from_dict(data.get("scheduling", {})))


@dataclass(frozen=True)
class TokenCommit:
    """New output tokens of one request."""

    request_id: str  #: the request
    start: int  #: index (in the request's output) of the first of `token_ids`
    token_ids: tuple[int, ...]  #: the tokens


@dataclass(frozen=True)
class FinishCommit:
    """A request that ended on the replica, with its whole output (authoritative)."""

    request_id: str  #: the request
    reason: str  #: "stop" | "length" | "abort"
    text: str  #: the decoded output
    token_ids: tuple[int, ...]  #: every output token


@dataclass(frozen=True)
class FailCommit:
    """A request the replica could not run."""

    request_id: str  #: the request
    error: str  #: why


@dataclass(frozen=True)
class ReplicaCommit:
    """One replica's iteration: one message per replica per iteration (never one per token)."""

    replica: str  #: the committing replica
    loop: LoopCounters  #: its cumulative loop counters
    tokens: tuple[TokenCommit, ...] = ()  #: new tokens
    finished: tuple[FinishCommit, ...] = ()  #: requests that ended
    failed: tuple[FailCommit, ...] = ()  #: requests that failed

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-friendly form."""
        return {"replica": self.replica, "loop": self.loop.to_wire(),
                "tokens": [[t.request_id, t.start, list(t.token_ids)] for t in self.tokens],
                "finished": [[f.request_id, f.reason, f.text, list(f.token_ids)] for f in self.finished],
                "failed": [[f.request_id, f.error] for f in self.failed]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ReplicaCommit:
        """Inverse of `to_wire`; raises `ValueError`/`TypeError`/`KeyError` on a malformed message."""
        return cls(str(data["replica"]), LoopCounters.from_wire(data["loop"]),
                   tuple(TokenCommit(str(r), int(s), tuple(int(t) for t in ids)) for r, s, ids in data["tokens"]),
                   tuple(FinishCommit(str(r), str(why), str(text), tuple(int(t) for t in ids))
                         for r, why, text, ids in data["finished"]),
                   tuple(FailCommit(str(r), str(e)) for r, e in data["failed"]))


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica reports once its engine is built."""

    replica: str  #: its id
    worker: str  #: its leader worker
    kv_bytes_per_token: int  #: KV bytes one cached token takes (all layers)
    weights: str  #: where its weights came from: "checkpoint" or "peer"
    weight_bytes_from_peer: int  #: bytes of weights a peer sent it
    parallel: tuple[int, int]  #: its (P, M)
    shards: tuple[str, ...]  #: its shard workers

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-friendly form."""
        return {"replica": self.replica, "worker": self.worker, "kv_bytes_per_token": self.kv_bytes_per_token,
                "weights": self.weights, "weight_bytes_from_peer": self.weight_bytes_from_peer,
                "parallel": list(self.parallel), "shards": list(self.shards)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ReplicaInfo:
        """Inverse of `to_wire`."""
        parallel = tuple(int(x) for x in data["parallel"])
        return cls(str(data["replica"]), str(data["worker"]), int(data["kv_bytes_per_token"]),
                   str(data["weights"]), int(data["weight_bytes_from_peer"]),
                   (parallel[0], parallel[1]), tuple(str(w) for w in data["shards"]))


@dataclass(frozen=True)
class MovedRequest:
    """One request a migration moved, with the KV bytes that went along."""

    request_id: str  #: the request
    kv_bytes: int  #: bytes of its KV cache moved (0: moved without KV)


@dataclass(frozen=True)
class StageReadyRecord:
    """When one new pipeline stage of a reshard was built (released to compute)."""

    stage: int  #: the new stage
    after: int  #: index of the transfer its ranks were built after (-1: before any)
    seconds: float  #: since the migration began
    later_transfers: int  #: transfers of the plan that landed after it was built


@dataclass(frozen=True)
class ReshardSummary:
    """What one switch of a sharded replica to another (P, M) did."""

    old: tuple[int, int] | None  #: its (P, M) before (None: it had none)
    new: tuple[int, int]  #: its (P, M) now
    epoch: int  #: its configuration epoch now
    shards: tuple[str, ...]  #: its shard workers now
    kv_requests: int  #: requests whose KV moved
    kv_bytes: int  #: KV bytes moved
    weight_bytes: int  #: weight bytes moved between workers
    checkpoint_bytes: int  #: weight bytes read from the checkpoint
    seconds: float  #: wall time of the switch
    peak_bytes: dict[str, int] = field(default_factory=dict)  #: measured peak bytes held, per worker
    planned_peak_bytes: dict[str, int] = field(default_factory=dict)  #: the plan's peak, per worker
    memory_bytes: dict[str, int] = field(default_factory=dict)  #: the bound it kept, per worker
    progressive: bool = True  #: stages released as their layers landed, releases applied
    use_mapper: bool = True  #: Kuhn-Munkres mapping (else the given order)
    stage_ready: tuple[StageReadyRecord, ...] = ()  #: per new stage, when it was built

    def to_wire(self) -> dict[str, Any]:
        """Msgpack-friendly form."""
        return {"old": list(self.old) if self.old else None, "new": list(self.new), "epoch": self.epoch,
                "shards": list(self.shards), "kv_requests": self.kv_requests, "kv_bytes": self.kv_bytes,
                "weight_bytes": self.weight_bytes, "checkpoint_bytes": self.checkpoint_bytes,
                "seconds": self.seconds, "peak_bytes": dict(self.peak_bytes),
                "planned_peak_bytes": dict(self.planned_peak_bytes), "memory_bytes": dict(self.memory_bytes),
                "progressive": self.progressive, "use_mapper": self.use_mapper,
                "stage_ready": [[s.stage, s.after, s.seconds, s.later_transfers] for s in self.stage_ready]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ReshardSummary:
        """Inverse of `to_wire` (also reads `ReconfigurationReport.summary()` plus "shards")."""
        old = data.get("old")
        new = tuple(int(x) for x in data["new"])
        return cls((int(old[0]), int(old[1])) if old else None, (new[0], new[1]), int(data["epoch"]),
                   tuple(str(w) for w in data["shards"]), int(data["kv_requests"]), int(data["kv_bytes"]),
                   int(data["weight_bytes"]), int(data["checkpoint_bytes"]), float(data["seconds"]),
                   {str(k): int(v) for k, v in data.get("peak_bytes", {}).items()},
                   {str(k): int(v) for k, v in data.get("planned_peak_bytes", {}).items()},
                   {str(k): int(v) for k, v in (data.get("memory_bytes") or {}).items()},
                   bool(data.get("progressive", True)), bool(data.get("use_mapper", True)),
                   tuple(StageReadyRecord(int(a), int(b), float(c), int(d))
                         for a, b, c, d in data.get("stage_ready", ())))


@dataclass(frozen=True)
class RequestWork:
    """A request handed to a replica: new, or resumed from its committed tokens."""

    request_id: str  #: the request
    prompt_token_ids: tuple[int, ...]  #: its prompt
    committed: tuple[int, ...]  #: output tokens already committed (resume from here)
    params: SamplingParams  #: how to sample
