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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Placement, Position, Worker
from elastic_llm.planning.mapper import DeviceMapper
from elastic_llm.planning.migration import Holding, MigrationPlanner, Transfer
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

    @property
    def leaving(self) -> tuple[str, ...]:
        """Workers without a new position."""
        return tuple(a.worker for a in self.assignments if a.new is None)


def plan_reconfiguration(spec: ModelSpec, old: Placement | None, new: ParallelConfig,
                         workers: Sequence[str], kv_tokens: int,
                         candidates: Sequence[str] | None = None) -> ReconfigurationPlan:
    """Map `candidates` (default: all of `workers`) onto `new` and plan the transfers.

    `workers`: all live ones (the old placement's and any new ones); every one of them can send
    what it holds, but only `candidates` (a subset) may take a new position, so a worker that is
    about to go (a preemption notice) hands its slices and KV over and then leaves. `kv_tokens` is
    the sum of the cached positions of the requests kept."""
    alive = {name: Worker(name) for name in workers}
    chosen = list(workers if candidates is None else candidates)
    if not set(chosen) <= set(alive):
        raise ValueError(f"candidates {sorted(set(chosen) - set(alive))} are not live workers")
    kv = {0: kv_tokens} if kv_tokens > 0 else {}
    if old is None:
        placement, inherits = Placement(new, tuple(chosen[: new.num_positions])), (None,)
    else:
        mapping = DeviceMapper(spec).map([alive[name] for name in chosen], old, new, kv_tokens=kv)
        placement, inherits = mapping.placement, mapping.inherits
    planner = MigrationPlanner(spec)
    held = planner.holdings(old, alive, kv)
    needs = planner.required(placement, inherits, kv, lost=set())
    if spec.tie_word_embeddings:
        held, needs = _tied(spec, held), _tied(spec, needs)
    moves = planner.transfers(held, needs, alive)
    ordered, _, _ = planner.order(moves, held, needs, alive)
    assignments = tuple(WorkerAssignment(name, old.position_of(name) if old else None,
                                         placement.position_of(name)) for name in workers)
    return ReconfigurationPlan(placement, tuple(ordered), assignments)


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
