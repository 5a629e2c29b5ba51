"""Bytes and seconds of the simulated fleet's data moves: weight loads, KV transfers, reshards.

- A new replica's workers each need their weight slice (an even split of the model); the bytes
  are summed per instance, and the busiest instance's share over the bandwidth (checkpoint or
  peer link) is the load time.
- KV transfers in flight are tickets (`MoveTimer.open` / `close`), so that a request cancelled
  while its KV is on the wire does not land on its target.
- A reshard: each new position needs its weight bytes minus what its worker already holds. With
  the device mapper, kept workers are matched to new positions by Kuhn-Munkres on the weight
  overlap (scipy's `linear_sum_assignment`); without it, the i-th worker takes the i-th position.
  The missing bytes come from peers over the link (the leaving worker still sends during its
  grace period); the busiest receiving instance sets the time. Without the progressive planner
  the engine is also rebuilt after everything landed (`engine_build_s` more).

These are estimates at SpotServe's level of detail (its planner also estimates the transfer time
from the largest per-instance volume over the link bandwidth). Pure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from elastic_llm.control import instructions as ins
from elastic_llm.control.messages import MovedRequest, ReshardSummary
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig
from elastic_llm.planning.slices import SliceAlgebra
from elastic_llm.sim.replica import SimReplica, SimRequest, kv_bytes, weight_bytes_per_worker
from elastic_llm.sim.results import SimSettings


@dataclass(frozen=True)
class ReshardPlan:
    """What one simulated reshard moves and how long its replica pauses."""

    weight_bytes: int  #: weight bytes sent between workers
    checkpoint_bytes: int  #: weight bytes read from the checkpoint (0: peers hold everything)
    kv_bytes: int  #: KV bytes moved
    kv_requests: int  #: requests whose KV moved
    pause_s: float  #: seconds the replica does not iterate

    def summary(self, old: tuple[int, int], order: ins.Reshard, epoch: int) -> ReshardSummary:
        """The `ReshardSummary` a live replica would report."""
        return ReshardSummary(old, order.parallel, epoch, order.workers, self.kv_requests, self.kv_bytes,
                              self.weight_bytes, self.checkpoint_bytes, self.pause_s,
                              progressive=order.progressive, use_mapper=order.use_mapper)


class MoveTimer:
    """Sizes and times the fleet's moves (see the module docstring)."""

    def __init__(self, spec: ModelSpec, settings: SimSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.algebra = SliceAlgebra(spec)
        self._tickets: dict[int, tuple[str, list[SimRequest]]] = {}
        self._ids = itertools.count()

    def bytes_per_instance(self, parallel: tuple[int, int], workers: Sequence[str],
                           instance_of: Callable[[str], str]) -> dict[str, int]:
        """Weight bytes each instance's workers of a new (P, M) replica load."""
        share = weight_bytes_per_worker(self.spec, parallel)
        totals: dict[str, int] = {}
        for worker in workers:
            totals[instance_of(worker)] = totals.get(instance_of(worker), 0) + share
        return totals or {"": share}

    # ------------------------------------------------------------------ KV in flight
    def open(self, target: str, requests: list[SimRequest]) -> int:
        """A transfer of `requests` to `target` starts; its ticket."""
        ticket = next(self._ids)
        self._tickets[ticket] = (target, requests)
        return ticket

    def close(self, ticket: int) -> list[SimRequest]:
        """The transfer landed: the requests still wanted at the target."""
        return self._tickets.pop(ticket, ("", []))[1]

    def cancel(self, target: str, request_ids: Sequence[str]) -> None:
        """These requests no longer go to `target` (they were cancelled or requeued)."""
        unwanted = set(request_ids)
        for ticket, (where, requests) in self._tickets.items():
            if where == target:
                self._tickets[ticket] = (where, [r for r in requests if r.request_id not in unwanted])

    def moved(self, request: SimRequest) -> MovedRequest:
        """The `MovedRequest` record of a request that arrived with its KV."""
        return MovedRequest(request.request_id, kv_bytes(self.spec, request))

    # ------------------------------------------------------------------ reshards
    def reshard(self, replica: SimReplica, order: ins.Reshard, instance_of: Callable[[str], str],
                spec: ModelSpec) -> ReshardPlan:
        """Bytes and pause of switching `replica` to `order.parallel` on `order.workers`."""
        old = ParallelConfig(1, *replica.parallel, 1)
        new = ParallelConfig(1, *order.parallel, 1)
        overlap = self.algebra.weight_overlap(old, new)
        need = np.array([self.algebra.weight_bytes(new, s, r) for s in range(new.P) for r in range(new.M)])
        kept = {w: i for i, w in enumerate(replica.workers) if i < old.P * old.M}
        held = np.zeros(len(need))
        if order.use_mapper:
            rows = [kept[w] for w in order.workers if w in kept]
            if rows:
                r, c = linear_sum_assignment(overlap[rows], maximize=True)
                held[c] = overlap[np.array(rows)[r], c]
            slot_worker = self._mapped(order.workers, kept, overlap, rows)
        else:
            for j, worker in enumerate(order.workers[: len(need)]):
                if worker in kept:
                    held[j] = overlap[kept[worker], j]
            slot_worker = list(order.workers[: len(need)])
        missing = np.maximum(need - held, 0)
        received: dict[str, float] = {}
        for j, worker in enumerate(slot_worker):
            received[instance_of(worker)] = received.get(instance_of(worker), 0.0) + float(missing[j])
        fraction = float(missing.sum() / max(need.sum(), 1))
        kv_total = sum(kv_bytes(spec, r) for r in (*replica.batch, *replica.waiting))
        kv_moved = int(kv_total * fraction)
        busiest = max(received.values(), default=0.0) + kv_moved / max(len(received), 1)
        pause = busiest / self.settings.link_bandwidth
        if not order.progressive:
            pause += self.settings.engine_build_s
        return ReshardPlan(int(missing.sum()), 0, kv_moved, len(replica.batch) + len(replica.waiting), pause)

    @staticmethod
    def _mapped(workers: Sequence[str], kept: dict[str, int], overlap: np.ndarray, rows: list[int]) -> list[str]:
        """Which worker takes each new position under Kuhn-Munkres (new workers fill the rest)."""
        slots: list[str | None] = [None] * overlap.shape[1]
        keepers = [w for w in workers if w in kept]
        if rows:
            r, c = linear_sum_assignment(overlap[rows], maximize=True)
            for row, col in zip(r, c, strict=True):
                slots[col] = keepers[row]
        fresh = iter([w for w in workers if w not in set(s for s in slots if s)])
        return [s if s is not None else next(fresh, workers[0]) for s in slots]
