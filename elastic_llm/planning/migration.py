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
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.arrangement import MigrationTimeModel
from elastic_llm.planning.config import Placement, Worker
from elastic_llm.planning.errors import MemoryBoundError, PlanningError
from elastic_llm.planning.mapper import inherit_replicas
from elastic_llm.planning.slices import Part, Slice, SliceAlgebra, subtract_interval

Key = tuple[int, Part, int]  #: Slice.key: (layer, part, batch)
Holding = tuple[tuple[Slice, ...], tuple[Slice, ...]]  #: (weight slices, KV slices) of a worker
Holder = tuple[int, int, list[str]]  #: (start, stop, workers holding exactly that interval)


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

    @staticmethod
    def _index(held: Mapping[str, Holding]) -> dict[Key, list[Holder]]:
        """{slice key: [(start, stop, live holders)]} sorted by start; shard intervals of one key
        never partly overlap. Weight slices are indexed once per group of workers holding the same
        (shared) tuple, i.e. per old (stage, rank)."""
        index: dict[Key, list[Holder]] = defaultdict(list)
        groups: dict[int, tuple[tuple[Slice, ...], list[str]]] = {}
        for name, (weights, kv) in held.items():
            groups.setdefault(id(weights), (weights, []))[1].append(name)
            for s in kv:
                index[s.key].append((s.start, s.stop, [name]))
        for weights, names in groups.values():
            names.sort()  # one shared list per group (callers cache per list)
            for s in weights:
                index[s.key].append((s.start, s.stop, names))
        shared: dict[tuple[int, ...], list[str]] = {}  # one merged list per set of groups
        for key, entries in index.items():
            if len(entries) > 1:  # e.g. replicated parts: one interval, many groups
                by_range: dict[tuple[int, int], list[list[str]]] = defaultdict(list)
                for start, stop, names in entries:
                    by_range[(start, stop)].append(names)
                index[key] = [(a, b, shared.setdefault(tuple(sorted(map(id, lists))),
                                                       sorted(n for ns in lists for n in ns)))
                              for (a, b), lists in sorted(by_range.items())]
        return index

    def _fetch(self, need: Slice, dst: Worker, index: Mapping[Key, list[Holder]],
               sent: dict[str | None, int], alive: Mapping[str, Worker],
               local: dict[tuple[int, str], list[str]] | None) -> list[Transfer]:
        """Transfers bringing ``need`` (which ``dst`` lacks entirely) from its holders; ``local``
        caches each holder list's members on one instance (None: no intra-instance link)."""
        out, cursor = [], need.start
        for start, stop, names in index.get(need.key, ()):
            lo, hi = max(start, cursor), min(stop, need.stop)
            if lo >= hi:
                continue
            if lo > cursor:
                out.append(self._transfer(None, dst.name, need.with_range(cursor, lo)))
            if local is not None:  # a holder on the same instance is faster
                cache_key = (id(names), dst.instance_id)
                if cache_key not in local:
                    local[cache_key] = [n for n in names
                                        if alive[n].instance_id == dst.instance_id] or names
                names = local[cache_key]
            src = min(names, key=sent.__getitem__)
            out.append(self._transfer(src, dst.name, need.with_range(lo, hi)))
            sent[src] += out[-1].nbytes
            cursor = hi
        if cursor < need.stop:
            if need.is_kv:
                raise PlanningError(f"KV slice {need} has no holder and no checkpoint")
            out.append(self._transfer(None, dst.name, need.with_range(cursor, need.stop)))
        return out

    def _transfer(self, src: str | None, dst: str, piece: Slice) -> Transfer:
        return Transfer(src, dst, piece, self.algebra.nbytes(piece))

    def transfers(self, held: Mapping[str, Holding],
                  needs: Mapping[str, Holding], alive: Mapping[str, Worker]) -> list[Transfer]:
        """Every transfer needed (unordered): the missing pieces of every required slice.

        A worker whose new slices are the very tuples it already holds needs nothing.
        """
        index = self._index(held)
        local: dict[tuple[int, str], list[str]] | None = (
            {} if self.intra_bandwidth is not None else None)
        sent: dict[str | None, int] = defaultdict(int)
        out: list[Transfer] = []
        for name in sorted(needs):
            mine = held.get(name, ((), ()))
            for have, want in zip(mine, needs[name], strict=True):
                if have is want:
                    continue
                for piece in _uncovered(want, have):
                    out += self._fetch(piece, alive[name], index, sent, alive, local)
        return out

    # ------------------------------------------------------------------ order under memory bounds
    def order(self, transfers: list[Transfer], held: Mapping[str, Holding],
              needs: Mapping[str, Holding], alive: Mapping[str, Worker]
              ) -> tuple[list[Transfer], list[Release], dict[str, int]]:
        """Memory-bounded progressive order: (transfers in order, releases, peak bytes per worker).

        Raises `MemoryBoundError` when no remaining transfer fits its target's bound.
        """
        pending = sorted(transfers, key=lambda t: (t.slice.batch < 0, t.slice.layer, t.dst,
                                                   t.slice.part, t.slice.start))  # KV first
        sizes: dict[int, int] = {}  # id(shared slice tuple) -> bytes
        for group in (g for h in held.values() for g in h):
            if id(group) not in sizes:
                sizes[id(group)] = sum(map(self.algebra.nbytes, group))
        usage = {name: sum(sizes[id(g)] for g in held.get(name, ())) for name in alive}
        peak = dict(usage)
        stale = self._stale(held, needs)
        uses: dict[tuple[str, Key], int] = defaultdict(int)
        for t in pending:
            if t.src is not None:
                uses[(t.src, t.slice.key)] += 1
        releases: list[Release] = []

        def release(after: int, owner: tuple[str, Key]) -> None:
            for piece in stale.get(owner, ()):
                releases.append(Release(after, owner[0], piece))
                usage[owner[0]] -= self.algebra.nbytes(piece)

        for owner in sorted(stale):
            if not uses[owner]:
                release(-1, owner)  # nobody reads it: free before the first transfer
        done, ordered, first = [False] * len(pending), [], 0
        while first < len(pending):
            pick = next((i for i in range(first, len(pending)) if not done[i] and
                         usage[pending[i].dst] + pending[i].nbytes <= alive[pending[i].dst].memory_bytes),
                        None)
            if pick is None:
                t = pending[first]
                raise MemoryBoundError(
                    f"no transfer fits: e.g. {t.nbytes} bytes to {t.dst} holding {usage[t.dst]} "
                    f"of {alive[t.dst].memory_bytes}"
                )
            t, done[pick] = pending[pick], True
            ordered.append(t)
            usage[t.dst] += t.nbytes
            peak[t.dst] = max(peak[t.dst], usage[t.dst])
            if t.src is not None:
                uses[(t.src, t.slice.key)] -= 1
                if not uses[(t.src, t.slice.key)]:
                    release(len(ordered) - 1, (t.src, t.slice.key))  # its last read is done
            while first < len(pending) and done[first]:
                first += 1
        return ordered, releases, peak

    @staticmethod
    def _stale(held: Mapping[str, Holding],
               needs: Mapping[str, Holding]) -> dict[tuple[str, Key], list[Slice]]:
        """{(worker, key): held pieces its new position does not need}."""
        stale: dict[tuple[str, Key], list[Slice]] = {}
        for name, mine in held.items():
            for have, want in zip(mine, needs.get(name, ((), ())), strict=True):
                if have is want:
                    continue
                for s in have:
                    pieces = list(_uncovered((s,), want))
                    if pieces:
                        stale[(name, s.key)] = pieces
        return stale

    # ------------------------------------------------------------------ timing and the plan
    def schedule(self, ordered: Sequence[Transfer], alive: Mapping[str, Worker]) -> list[float]:
        """End time (seconds from the start) of each transfer, replayed in order on per-device
        full-duplex queues at the lower of both ends' bandwidth."""
        send_free: dict[str, float] = defaultdict(float)
        recv_free: dict[str, float] = defaultdict(float)
        ends = []
        for t in ordered:
            dst = alive[t.dst]
            if t.src is None:
                rate, start = min(self.storage_bandwidth, dst.bandwidth), recv_free[t.dst]
            else:
                src = alive[t.src]
                same = self.intra_bandwidth is not None and src.instance_id == dst.instance_id
                rate = self.intra_bandwidth if same else min(src.bandwidth, dst.bandwidth)
                start = max(send_free[t.src], recv_free[t.dst])
            end = start + t.nbytes / rate  # type: ignore[operator]
            recv_free[t.dst] = end
            if t.src is not None:
                send_free[t.src] = end
            ends.append(end)
        return ends

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
        ends = self.schedule(ordered, alive)
        kv_only = [t for t in ordered if t.slice.is_kv]
        weights_only = [t for t in ordered if not t.slice.is_kv]
        kept = {b for b in inherits if b is not None and b not in lost}
        return MigrationPlan(
            transfers=tuple(ordered),
            releases=tuple(sorted(releases, key=lambda r: r.after)),
            readiness=_readiness(new, ordered, ends),
            peak_bytes=peak,
            estimated_seconds=max(ends, default=0.0),
            weight_seconds=max(self.schedule(weights_only, alive), default=0.0),
            kv_seconds=max(self.schedule(kv_only, alive), default=0.0),
            kv_total_bytes=sum(kv_tokens.get(b, 0) for b in kept) * self.model.kv_bytes_per_token,
            lost_batches=tuple(sorted(lost)),
        )


def _readiness(new: Placement, ordered: Sequence[Transfer],
               ends: Sequence[float]) -> tuple[StageReadiness, ...]:
    """Per new (replica, stage): index of its last incoming transfer and when all of them end."""
    last: dict[str, int] = {}
    finish: dict[str, float] = defaultdict(float)
    for i, t in enumerate(ordered):
        last[t.dst] = i
        finish[t.dst] = max(finish[t.dst], ends[i])
    stages: dict[tuple[int, int], list[str]] = defaultdict(list)
    for pos, name in new.items():
        stages[(pos.replica, pos.stage)].append(name)
    return tuple(
        StageReadiness(replica, stage, max(last.get(n, -1) for n in names),
                       max(finish.get(n, 0.0) for n in names))
        for (replica, stage), names in sorted(stages.items())
    )


def _uncovered(slices: Iterable[Slice], cover: Iterable[Slice]) -> Iterator[Slice]:
    """The pieces of `slices` that the same-key slice in `cover` does not cover."""
    by_key = {s.key: s for s in cover}
    for s in slices:
        other = by_key.get(s.key)
        gaps = ([(s.start, s.stop)] if other is None
                else subtract_interval(s.start, s.stop, other.start, other.stop))
        for a, b in gaps:
            yield s.with_range(a, b)
