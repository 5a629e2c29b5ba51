"""Planning a reconfiguration of one replica with the planning core (no processes, no torch).

Which worker takes which new position: the Kuhn-Munkres `DeviceMapper` (most reusable bytes of
weights and KV stay in place). What moves: `MigrationPlanner.transfers` on the holdings of the
old and new placement (only the pieces a new position lacks, each fetched once, from the least
loaded holder, or read from the checkpoint when no live worker holds it), in its progressive order
(KV first, then weights front to back).

One deviation from the planner's own `plan`: for a model whose LM head is tied to the embedding the
two are one tensor here, so holdings are rewritten before planning: the embedding becomes "every
LM-head row". A worker that holds the embedding then never receives LM-head rows, and an LM-head
holder only receives the embedding rows it lacks.

The whole plan is kept, not only the transfers: the planner's `Release`s (what each worker frees,
and after which transfer) and per-stage `StageReadiness` (after which transfer a new stage holds
everything) are what make the live migration progressive and memory-bounded. Two ablations
(SpotServe's): ``use_mapper=False`` places the workers in the given order instead of by
Kuhn-Munkres; ``progressive=False`` moves everything first and only then rebuilds (no early stage
release, no memory bound, nothing freed before the end).

Peers: shards of OTHER live replicas (`PeerShard`) may be named as extra holders of weights (never
of KV, never of a new position). The planner then takes each missing piece from a member or a
peer, and reads from the checkpoint only what none of them holds. Peers keep what they hold (no
releases, no peak of theirs in the plan: their own replica goes on serving).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from elastic_llm.engine.replica.messages import PeerShard
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Placement, Position, Worker
from elastic_llm.planning.mapper import DeviceMapper
from elastic_llm.planning.migration import (
    Holding,
    MigrationPlanner,
    Release,
    StageReadiness,
    Transfer,
    stage_readiness,
)
from elastic_llm.planning.slices import Part, Slice


@dataclass(frozen=True)
class WorkerAssignment:
    """One worker's position before and after a reconfiguration."""

    worker: str  #: worker name
    old: Position | None  #: None: it joined now
    new: Position | None  #: None: it leaves


@dataclass(frozen=True)
class ReconfigurationPlan:
    """The mapping and the ordered transfers of one reconfiguration."""

    placement: Placement  #: worker at each new position
    transfers: tuple[Transfer, ...]  #: in execution order
    assignments: tuple[WorkerAssignment, ...]  #: every worker involved, in the given order
    #: what each worker frees and after which transfer (-1: before the first), ordered by
    #: ``after``; empty when not `progressive` (everything old is dropped at the end)
    releases: tuple[Release, ...] = ()
    #: per new stage (canonical order): the index of the transfer after which it holds all it
    #: needs; not `progressive`: the last transfer for every stage
    readiness: tuple[StageReadiness, ...] = ()
    #: {worker: most bytes (weights + KV) the plan has it hold at any point}
    planned_peak_bytes: Mapping[str, int] = field(default_factory=dict)
    #: {worker: its memory bound in bytes}, only where one was given (and `progressive`)
    memory_bytes: Mapping[str, int] = field(default_factory=dict)
    progressive: bool = True  #: releases and early stage builds are to be carried out

    @property
    def leaving(self) -> tuple[str, ...]:
        """Workers without a new position."""
        return tuple(a.worker for a in self.assignments if a.new is None)


def plan_reconfiguration(spec: ModelSpec, old: Placement | None, new: ParallelConfig,
                         workers: Sequence[str], kv_tokens: int,
                         candidates: Sequence[str] | None = None, *,
                         memory_bytes: int | Mapping[str, int] | None = None,
                         use_mapper: bool = True, progressive: bool = True,
                         peers: Sequence[PeerShard] = ()) -> ReconfigurationPlan:
    """Map `candidates` (default: all of `workers`) onto `new` and plan the whole migration.

    `workers`: all live ones (the old placement's and any new ones); every one of them can send
    what it holds, but only `candidates` (a subset) may take a new position, so a worker that is
    about to go (a preemption notice) hands its slices and KV over and then leaves. `kv_tokens` is
    the sum of the cached positions of the requests kept. `memory_bytes`: every worker's bound on
    weights + KV (one number for all, or {worker: bytes}; missing: unbounded), honoured only when
    `progressive`. `use_mapper`: Kuhn-Munkres placement, else `candidates` in the given order.
    `peers`: shards of other replicas that can send the weights they hold (see the module
    docstring); a transfer from one has `src` = its `PeerShard.name`.

    Raises:
        MemoryBoundError: no order keeps every worker within its bound.
        ValueError: a peer's name is one of `workers`, or named twice.
    """
    bounds = _bounds(workers, memory_bytes) if progressive else {}
    alive = {name: Worker(name, memory_bytes=bounds.get(name, Worker.memory_bytes))
             for name in workers}
    chosen = list(workers if candidates is None else candidates)
    if not set(chosen) <= set(alive):
        raise ValueError(f"candidates {sorted(set(chosen) - set(alive))} are not live workers")
    kv = {0: kv_tokens} if kv_tokens > 0 else {}
    if old is None or not use_mapper:
        placement = Placement(new, tuple(chosen[: new.num_positions]))
        inherits: Sequence[int | None] = (None,) if old is None else (0,)
    else:
        mapping = DeviceMapper(spec).map([alive[name] for name in chosen], old, new, kv_tokens=kv)
        placement, inherits = mapping.placement, mapping.inherits
    planner = MigrationPlanner(spec)
    held = {**planner.holdings(old, alive, kv), **_peer_holdings(planner, peers, alive)}
    needs = planner.required(placement, inherits, kv, lost=set())
    if spec.tie_word_embeddings:
        held, needs = _tied(spec, held), _tied(spec, needs)
    moves = planner.transfers(held, needs, alive)
    layer_of = _embedding_first(spec, placement) if spec.tie_word_embeddings else None
    ordered, releases, peak = planner.order(moves, held, needs, alive, layer_of)
    ends = planner.schedule(ordered, alive)
    readiness = stage_readiness(placement, ordered, ends)
    if not progressive:  # everything moves first, nothing is freed before the end
        peak = _unreleased_peak(planner, held, ordered, alive)
        readiness = tuple(StageReadiness(r.replica, r.stage, len(ordered) - 1, max(ends, default=0.0))
                          for r in readiness)
        releases = []
    assignments = tuple(WorkerAssignment(name, old.position_of(name) if old else None,
                                         placement.position_of(name)) for name in workers)
    outside = {p.name for p in peers}  # peers keep what they hold and are not ours to bound
    releases = [r for r in releases if r.worker not in outside]
    peak = {name: nbytes for name, nbytes in peak.items() if name not in outside}
    return ReconfigurationPlan(placement, tuple(ordered), assignments,
                               tuple(sorted(releases, key=lambda r: r.after)), readiness, peak,
                               bounds, progressive)


def _peer_holdings(planner: MigrationPlanner, peers: Sequence[PeerShard],
                   alive: dict[str, Worker]) -> dict[str, Holding]:
    """{peer name: (its weight slices, no KV)}; each peer is added to `alive` (unbounded)."""
    out: dict[str, Holding] = {}
    for peer in peers:
        if peer.name in alive or peer.name in out:
            raise ValueError(f"peer {peer.name!r} is a member of the replica or named twice")
        (stages, degree) = peer.parallel
        config = ParallelConfig(D=1, P=stages, M=degree, B=1)
        out[peer.name] = (planner.algebra.weight_slices(config, Position(0, peer.stage, peer.rank)), ())
        alive[peer.name] = Worker(peer.name)
    return out


def _embedding_first(spec: ModelSpec, placement: Placement) -> Callable[[Transfer], int]:
    """Sort LM-head rows sent to a first-stage worker (its embedding, tied) before layer 0."""
    first = {name for pos, name in placement.items() if pos.stage == 0}

    def layer_of(t: Transfer) -> int:
        return -1 if t.slice.part is Part.HEAD and t.dst in first else t.slice.layer

    return layer_of


def _bounds(workers: Sequence[str], memory_bytes: int | Mapping[str, int] | None) -> dict[str, int]:
    """{worker: bound} for the workers that have one."""
    if memory_bytes is None:
        return {}
    if isinstance(memory_bytes, int):
        return {name: memory_bytes for name in workers}
    return {name: int(memory_bytes[name]) for name in workers if name in memory_bytes}


def _unreleased_peak(planner: MigrationPlanner, held: Mapping[str, Holding],
                     ordered: Sequence[Transfer], alive: Mapping[str, Worker]) -> dict[str, int]:
    """{worker: old holding + everything it receives}: the peak when nothing is freed early."""
    peak = {name: sum(map(planner.algebra.tuple_bytes, held.get(name, ()))) for name in alive}
    for t in ordered:
        peak[t.dst] += t.nbytes
    return peak


def _tied(spec: ModelSpec, holdings: Mapping[str, Holding]) -> dict[str, Holding]:
    """Holdings with the embedding expressed as every LM-head row (one tensor when tied)."""
    out = {}
    for name, (weights, kv) in holdings.items():
        head = [s for s in weights if s.part in (Part.EMBED, Part.HEAD)]
        if not head:
            out[name] = (weights, kv)
            continue
        rest = tuple(s for s in weights if s.part not in (Part.EMBED, Part.HEAD))
        if any(s.part is Part.EMBED for s in head):
            rows = Slice(spec.num_layers, Part.HEAD, 0, spec.vocab_size)
        else:
            (rows,) = head
        out[name] = ((*rest, rows), kv)
    return out
