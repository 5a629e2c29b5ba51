"""Migration planner: the ordered transfers that turn the old holdings into the new placement.

Plans are data (`MigrationPlan`); the controller executes them in order and may refuse a step.

* **Only what the target lacks**: for every slice a new position requires, the part the worker
  already holds stays; each missing piece is cut along the old shard boundaries and fetched once
  from one holder, the least-loaded so far (round robin among equals, same instance first). Pieces
  no live worker holds come from the checkpoint (``src=None``). A batch whose KV is partly on a
  lost worker is *lost*: its requests recompute; none of its KV is sent.
* **Order**: KV of interrupted requests first, then weights layer by layer from the front
  (embedding, layers 0..L-1, LM head), so early stages can run while later layers still move;
  each new (replica, stage) is *ready* right after its last transfer (`StageReadiness`).
* **Memory bound**: greedily the earliest transfer whose target stays within its bound. A worker
  frees what its new position does not need as soon as its last transfer as sender is done
  (`Release`); stale pieces nobody reads are freed before the first transfer.
* **Time**: transfers replayed in plan order on per-device send/receive queues (full duplex),
  each at the lower of both ends' bandwidth (the intra-instance link within an instance, the
  storage bandwidth for checkpoint reads).

Cost: per plan, the Python work is per transfer and per release, not per held slice. Workers
whose slice tuples are unchanged are skipped; the uncovered pieces and their cuts along holder
intervals are computed once per pair of shared slice tuples (`_Gaps`) and per piece; holders are
indexed lazily, one batch of KV at a time (`_HolderIndex`); the least-loaded sender comes from a
lazy heap per holder list (`_Senders`) instead of a scan (all four in `migration_index`); the
three timelines are one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.arrangement import MigrationTimeModel
from elastic_llm.planning.config import Placement, Worker
from elastic_llm.planning.errors import MemoryBoundError, PlanningError
from elastic_llm.planning.mapper import inherit_replicas
from elastic_llm.planning.migration_index import Holding, Key, _Gaps, _HolderIndex, _Queues, _Senders
from elastic_llm.planning.slices import Slice, SliceAlgebra

_Segment = tuple[Slice, int, "list[str] | None"]  #: (piece, bytes, holders; None = checkpoint)


@dataclass(frozen=True)
class Transfer:
    """Send ``slice`` from ``src`` (None: the checkpoint in object storage) to ``dst``."""

    src: str | None  #: sending worker, or None to read the checkpoint
    dst: str  #: receiving worker
    slice: Slice  #: what moves
    nbytes: int  #: its size in bytes


@dataclass(frozen=True)
class Release:
    """``worker`` may free ``slice`` once transfer ``after`` is done (-1: before the first)."""

    after: int  #: index into `MigrationPlan.transfers`, -1 = at the start
    worker: str  #: who frees it
    slice: Slice  #: what is freed (not needed by the worker's new position)


@dataclass(frozen=True)
class StageReadiness:
    """When new stage ``stage`` of ``replica`` holds everything it needs."""

    replica: int  #: new replica
    stage: int  #: new stage
    after: int  #: index of its last incoming transfer, -1 when nothing had to move
    seconds: float  #: estimated seconds after the migration starts


@dataclass(frozen=True)
class MigrationPlan:
    """Ordered transfers and everything the controller needs to execute and time them."""

    transfers: tuple[Transfer, ...]  #: in execution order
    releases: tuple[Release, ...]  #: frees, ordered by ``after``
    readiness: tuple[StageReadiness, ...]  #: per new (replica, stage), canonical order
    peak_bytes: Mapping[str, int]  #: {worker: most bytes it holds at any point of the plan}
    estimated_seconds: float  #: all transfers done
    weight_seconds: float  #: the weight transfers alone
    kv_seconds: float  #: the KV transfers alone
    kv_total_bytes: int  #: KV of every batch the new placement keeps (moved or in place)
    lost_batches: tuple[int, ...]  #: old replicas whose KV cannot be recovered (recompute)

    @property
    def weight_bytes(self) -> int:
        """Weight bytes moved (storage reads included)."""
        return sum(t.nbytes for t in self.transfers if not t.slice.is_kv)

    @property
    def kv_bytes(self) -> int:
        """KV-cache bytes moved."""
        return sum(t.nbytes for t in self.transfers if t.slice.is_kv)

    def time_model(self) -> MigrationTimeModel:
        """The plan's timing as the arrangement needs it: weights as a fixed cost, KV as a rate."""
        rate = self.kv_total_bytes / self.kv_seconds if self.kv_seconds > 0 else math.inf
        return MigrationTimeModel(base_seconds=self.weight_seconds, kv_bytes_per_second=rate)


class MigrationPlanner:
    """Plans migrations for one model."""

    def __init__(self, model: ModelSpec, storage_bandwidth: float = 1.25e9,
                 intra_instance_bandwidth: float | None = None) -> None:
        """``storage_bandwidth``: bytes/s of a checkpoint read (default 10 Gbps);
        ``intra_instance_bandwidth``: bytes/s between devices of one instance (None: network)."""
        self.model = model
        self.algebra = SliceAlgebra(model)
        self.storage_bandwidth = storage_bandwidth
        self.intra_bandwidth = intra_instance_bandwidth

    # ------------------------------------------------------------------ holdings and needs
    def holdings(self, old: Placement | None, alive: Mapping[str, Worker],
                 kv_tokens: Mapping[int, int]) -> dict[str, Holding]:
        """{worker: (weight slices, KV slices)} every live worker of ``old`` holds now."""
        if old is None:
            return {}
        return {name: (self.algebra.weight_slices(old.config, pos),
                       self.algebra.kv_slices(old.config, pos, pos.replica,
                                              kv_tokens.get(pos.replica, 0)))
                for pos, name in old.items() if name in alive}

    def required(self, new: Placement, inherits: Sequence[int | None],
                 kv_tokens: Mapping[int, int], lost: set[int]) -> dict[str, Holding]:
        """{worker: (weight slices, KV slices)} its new position needs; lost batches' KV left out."""
        needs = {}
        for pos, name in new.items():
            batch = inherits[pos.replica]
            keep = batch is not None and batch not in lost
            needs[name] = (self.algebra.weight_slices(new.config, pos),
                           self.algebra.kv_slices(new.config, pos, batch if keep else -1,
                                                  kv_tokens.get(batch, 0) if keep else 0))
        return needs

    @staticmethod
    def lost_batches(old: Placement | None, alive: Mapping[str, Worker],
                     kv_tokens: Mapping[int, int]) -> set[int]:
        """Old replicas with cached KV of which some position's worker is gone."""
        if old is None:
            return set()
        return {pos.replica for pos, name in old.items()
                if name not in alive and kv_tokens.get(pos.replica, 0) > 0}

    def transfers(self, held: Mapping[str, Holding],
                  needs: Mapping[str, Holding], alive: Mapping[str, Worker]) -> list[Transfer]:
        """Every transfer needed (unordered): the missing pieces of every required slice.

        A worker whose new slices are the very tuples it already holds needs nothing. Workers are
        served in name order; each piece goes to the holder that has sent the fewest bytes so
        far (the first such in name order), preferring holders on the target's instance when an
        intra-instance link is given.
        """
        index = _HolderIndex(held)
        senders = _Senders({n: w.instance_id for n, w in alive.items()}
                           if self.intra_bandwidth is not None else None)
        gaps = _Gaps()
        segments: dict[int, tuple[Slice, list[_Segment]]] = {}  # id(piece) -> (piece, its cuts)
        out: list[Transfer] = []
        for name in sorted(needs):
            instance = alive[name].instance_id
            for have, want in zip(held.get(name, ((), ())), needs[name], strict=True):
                if have is want:
                    continue
                for _, pieces in gaps(want, have):
                    for piece in pieces:
                        if id(piece) not in segments:
                            segments[id(piece)] = (piece, self._segments(piece, index))
                        for cut, nbytes, holders in segments[id(piece)][1]:
                            src = None if holders is None else senders.pick(holders, instance,
                                                                           nbytes)
                            out.append(Transfer(src, name, cut, nbytes))
        return out

    def _segments(self, need: Slice, index: _HolderIndex) -> list[_Segment]:
        """``need`` cut along its holders' shard boundaries: (piece, bytes, holders or None for the
        checkpoint). Raises `PlanningError` when a KV piece has no holder."""
        out: list[_Segment] = []
        cursor = need.start
        for start, stop, names in index.entries(need.key):
            if start >= need.stop:
                break  # entries are sorted by start
            lo, hi = max(start, cursor), min(stop, need.stop)
            if lo >= hi:
                continue
            if lo > cursor:
                out.append(self._segment(need, cursor, lo, None))
            out.append(self._segment(need, lo, hi, names))
            cursor = hi
        if cursor < need.stop:
            if need.is_kv:
                raise PlanningError(f"KV slice {need} has no holder and no checkpoint")
            out.append(self._segment(need, cursor, need.stop, None))
        return out

    def _segment(self, need: Slice, start: int, stop: int,
                 holders: list[str] | None) -> _Segment:
        """Units ``[start, stop)`` of ``need`` (``need`` itself when whole), bytes, holders."""
        piece = need if (start, stop) == (need.start, need.stop) else need.with_range(start, stop)
        return (piece, self.algebra.nbytes(piece), holders)

    # ------------------------------------------------------------------ order under memory bounds
    def order(self, transfers: list[Transfer], held: Mapping[str, Holding],
              needs: Mapping[str, Holding], alive: Mapping[str, Worker],
              layer_of: Callable[[Transfer], int] | None = None
              ) -> tuple[list[Transfer], list[Release], dict[str, int]]:
        """Memory-bounded progressive order: (transfers in order, releases, peak bytes per worker).

        ``layer_of``: where a transfer sorts front to back (default its slice's layer; a caller
        that stores the embedding as LM-head rows of a tied model sorts those as the embedding).
        Raises `MemoryBoundError` when no remaining transfer fits its target's bound.
        """
        layer = layer_of or (lambda t: t.slice.layer)
        pending = sorted(transfers, key=lambda t: (t.slice.batch < 0, layer(t), t.dst,
                                                   t.slice.part, t.slice.start))  # KV first
        usage = {name: sum(map(self.algebra.tuple_bytes, held.get(name, ()))) for name in alive}
        peak = dict(usage)
        bound = {name: w.memory_bytes for name, w in alive.items()}
        stale = self._stale(held, needs)
        owners: dict[tuple[str, Key], int] = {}  # (sender, key) -> its number
        owner_of = [-1 if t.src is None else owners.setdefault((t.src, t.slice.key), len(owners))
                    for t in pending]
        uses = [0] * len(owners)  # transfers left that read each (sender, key)
        for o in owner_of:
            if o >= 0:
                uses[o] += 1
        releases: list[Release] = []
        freed: dict[int, int] = {}  # id(stale piece list) -> its bytes (the lists are shared)

        def release(after: int, owner: tuple[str, Key]) -> None:
            pieces = stale.get(owner)
            if pieces:
                releases.extend(Release(after, owner[0], piece) for piece in pieces)
                if id(pieces) not in freed:
                    freed[id(pieces)] = self.algebra.total_bytes(pieces)
                usage[owner[0]] -= freed[id(pieces)]

        for owner in sorted(o for o in stale if o not in owners):
            release(-1, owner)  # nobody reads it: free before the first transfer
        dst_of = [t.dst for t in pending]
        size_of = [t.nbytes for t in pending]
        senders = list(owners)
        done, ordered, first = [False] * len(pending), [], 0
        while first < len(pending):
            dst = dst_of[first]  # the earliest transfer that fits (``first`` is never done)
            pick = first if usage[dst] + size_of[first] <= bound[dst] else next(
                (i for i in range(first + 1, len(pending))
                 if not done[i] and usage[dst_of[i]] + size_of[i] <= bound[dst_of[i]]), None)
            if pick is None:
                t = pending[first]
                raise MemoryBoundError(
                    f"no transfer fits: e.g. {t.nbytes} bytes to {t.dst} holding {usage[t.dst]} "
                    f"of {alive[t.dst].memory_bytes}"
                )
            done[pick] = True
            ordered.append(pending[pick])
            dst = dst_of[pick]
            usage[dst] += size_of[pick]
            if usage[dst] > peak[dst]:
                peak[dst] = usage[dst]
            owner = owner_of[pick]
            if owner >= 0:
                uses[owner] -= 1
                if not uses[owner]:
                    release(len(ordered) - 1, senders[owner])  # its last read is done
            while first < len(pending) and done[first]:
                first += 1
        return ordered, releases, peak

    @staticmethod
    def _stale(held: Mapping[str, Holding],
               needs: Mapping[str, Holding]) -> dict[tuple[str, Key], list[Slice]]:
        """{(worker, key): held pieces its new position does not need}."""
        stale: dict[tuple[str, Key], list[Slice]] = {}
        gaps = _Gaps()
        for name, mine in held.items():
            for have, want in zip(mine, needs.get(name, ((), ())), strict=True):
                if have is want:
                    continue
                for key, pieces in gaps(have, want):
                    if pieces:
                        stale[(name, key)] = pieces
        return stale

    # ------------------------------------------------------------------ timing and the plan
    def schedule(self, ordered: Sequence[Transfer], alive: Mapping[str, Worker]) -> list[float]:
        """End time (seconds from the start) of each transfer, replayed in order on per-device
        full-duplex queues at the lower of both ends' bandwidth."""
        return self._timeline(ordered, alive)[0]

    def _timeline(self, ordered: Sequence[Transfer], alive: Mapping[str, Worker]
                  ) -> tuple[list[float], float, float]:
        """`schedule`, plus when the weight transfers and the KV transfers would end if each kind
        were replayed alone (one pass; each kind on queues of its own)."""
        together, weights, kv = _Queues(), _Queues(), _Queues()
        rates: dict[tuple[str | None, str], float] = {}
        ends = []
        weight_end = kv_end = 0.0
        for t in ordered:
            rate = rates.get((t.src, t.dst))
            if rate is None:
                rate = rates[(t.src, t.dst)] = self._rate(t.src, t.dst, alive)
            seconds = t.nbytes / rate
            ends.append(together.run(t.src, t.dst, seconds))
            if t.slice.batch >= 0:  # KV cache
                kv_end = max(kv_end, kv.run(t.src, t.dst, seconds))
            else:
                weight_end = max(weight_end, weights.run(t.src, t.dst, seconds))
        return ends, weight_end, kv_end

    def _rate(self, src: str | None, dst: str, alive: Mapping[str, Worker]) -> float:
        """Bytes/s from ``src`` (None: the checkpoint) to ``dst``."""
        target = alive[dst]
        if src is None:
            return min(self.storage_bandwidth, target.bandwidth)
        source = alive[src]
        if self.intra_bandwidth is not None and source.instance_id == target.instance_id:
            return self.intra_bandwidth
        return min(source.bandwidth, target.bandwidth)

    def plan(self, new: Placement, workers: Sequence[Worker], old: Placement | None = None,
             kv_tokens: Mapping[int, int] | None = None,
             inherits: Sequence[int | None] | None = None) -> MigrationPlan:
        """Plan the move from ``old`` (None: cold start from the checkpoint) to ``new``.

        ``workers``: every reachable device, with its memory bound and bandwidth: the new
        placement's workers plus those leaving within their grace period (senders only). Workers of
        ``old`` missing from it are lost. ``kv_tokens``: {old replica: cached tokens of its
        interrupted batch}. ``inherits``: new replica -> old replica whose batch it takes over
        (default: `inherit_replicas` by cached tokens, as the mapper does).
        """
        alive = {w.name: w for w in workers}
        missing = [name for name in new.workers if name not in alive]
        if missing:
            raise PlanningError(f"new placement uses unknown workers {missing[:3]}")
        kv_tokens = dict(kv_tokens or {})
        if inherits is None:
            inherits = (inherit_replicas(old.config.D, new.config.D, kv_tokens)
                        if old is not None else (None,) * new.config.D)
        if len(inherits) != new.config.D:
            raise PlanningError("inherits must name one old replica (or None) per new replica")
        lost = self.lost_batches(old, alive, kv_tokens)
        held = self.holdings(old, alive, kv_tokens)
        needs = self.required(new, inherits, kv_tokens, lost)
        moves = self.transfers(held, needs, alive)
        ordered, releases, peak = self.order(moves, held, needs, alive)
        ends, weight_seconds, kv_seconds = self._timeline(ordered, alive)
        kept = {b for b in inherits if b is not None and b not in lost}
        return MigrationPlan(
            transfers=tuple(ordered),
            releases=tuple(sorted(releases, key=lambda r: r.after)),
            readiness=stage_readiness(new, ordered, ends),
            peak_bytes=peak,
            estimated_seconds=max(ends, default=0.0),
            weight_seconds=weight_seconds,
            kv_seconds=kv_seconds,
            kv_total_bytes=sum(kv_tokens.get(b, 0) for b in kept) * self.model.kv_bytes_per_token,
            lost_batches=tuple(sorted(lost)),
        )


def stage_readiness(new: Placement, ordered: Sequence[Transfer],
                    ends: Sequence[float]) -> tuple[StageReadiness, ...]:
    """Per new (replica, stage), canonical order: index of its last incoming transfer in
    ``ordered`` (-1: none) and when all of them end (``ends``: `MigrationPlanner.schedule`)."""
    last: dict[str, int] = {}
    finish: dict[str, float] = {}
    for i, t in enumerate(ordered):
        last[t.dst] = i
        finish[t.dst] = max(finish.get(t.dst, 0.0), ends[i])
    ranks, stages = new.config.M, new.config.P
    out = []
    for group in range(new.config.D * stages):  # canonical order: replica, then stage
        names = new.workers[group * ranks:(group + 1) * ranks]
        out.append(StageReadiness(group // stages, group % stages,
                                  max(last.get(n, -1) for n in names),
                                  max(finish.get(n, 0.0) for n in names)))
    return tuple(out)
