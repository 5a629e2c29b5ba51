"""Device mapper: which worker takes which position of the new configuration (Kuhn-Munkres).

Edge weight between a worker and a new position = the bytes of model context the worker already
holds that the position needs: shared weight slices (any replica: weights are identical) plus,
when the position's replica inherits the worker's old batch of interrupted requests, the shared
KV-cache slices. `scipy.optimize.linear_sum_assignment(maximize=True)` finds the maximum-weight
matching (rectangular: spare workers stay idle).

**Replica inheritance.** When D shrinks, the new replicas inherit the batches of the old replicas
with the most decoding progress; kept replicas keep their relative order, so an unchanged
configuration maps every replica to itself.

**Exact tie-break.** Many matchings reuse the same bytes (weights are the same in every replica).
Weights are divided by their GCD and scaled so that a bonus of 1 for "worker stays at its own
(inherited) position" can never outweigh a single byte; the matrix stays integer-valued and exact
in float64 while ``max weight * positions * (positions + 1) < 2**53``, else the bonus is dropped
(the byte optimum is still exact). So identical configurations map every worker to itself.

**Two levels** for multi-device instances (all instances holding G > 1 devices): positions are cut
in canonical order into slots of G (a tensor group of M <= G ranks never straddles two slots);
first each (instance, slot) pair gets the best matching of its G devices to the slot's G
positions, then instances are matched to slots. This keeps tensor groups inside one instance.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Placement, Worker
from elastic_llm.planning.errors import PlanningError
from elastic_llm.planning.slices import SliceAlgebra

_EXACT = float(2**53)
_PERMUTATION_LIMIT = 5  # devices per instance up to which the inner matching enumerates permutations


@dataclass(frozen=True)
class MappingResult:
    """The mapper's decision and what it saves."""

    placement: Placement  #: worker at every new position
    inherits: tuple[int | None, ...]  #: new replica -> old replica whose batch (KV) it takes over
    reused_weight_bytes: int  #: weight bytes already in place under ``placement``
    reused_kv_bytes: int  #: KV bytes already in place under ``placement``
    idle: tuple[str, ...]  #: workers given no position

    @property
    def reused_bytes(self) -> int:
        """Weight + KV bytes that need not move."""
        return self.reused_weight_bytes + self.reused_kv_bytes


def inherit_replicas(old_replicas: int, new_replicas: int,
                     progress: Mapping[int, float] | None = None) -> tuple[int | None, ...]:
    """For each new replica, the old replica whose running batch it takes over (None: fresh).

    The ``min(old, new)`` old replicas with the most ``progress`` (decoded tokens; ties to the lower
    index) are kept, in their old order, as new replicas 0, 1, ...
    """
    progress = progress or {}
    ranked = sorted(range(old_replicas), key=lambda r: (-progress.get(r, 0.0), r))
    kept = sorted(ranked[:new_replicas])
    return tuple(kept[d] if d < len(kept) else None for d in range(new_replicas))


class DeviceMapper:
    """Maps workers to the positions of a new configuration for one model."""

    def __init__(self, model: ModelSpec) -> None:
        """Bind the mapper to ``model``'s slice algebra."""
        self.algebra = SliceAlgebra(model)

    def reuse_matrix(self, workers: Sequence[Worker], old: Placement | None,
                     new: ParallelConfig, inherits: Sequence[int | None],
                     kv_tokens: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(weight bytes, KV bytes) each worker already holds of each new position.

        Both are int64 arrays of shape (len(workers), new.num_positions), positions in canonical
        order. ``kv_tokens`` maps an old replica to the tokens its interrupted batch has cached.
        """
        n_pos = new.num_positions
        weights = np.zeros((len(workers), n_pos), dtype=np.int64)
        kv = np.zeros_like(weights)
        if old is None:
            return weights, kv
        col = np.arange(n_pos) % (new.P * new.M)  # (stage, rank) index of each position
        col_replica = np.arange(n_pos) // (new.P * new.M)
        w_table = self.algebra.weight_overlap(old.config, new)
        kv_table = self.algebra.kv_overlap_per_token(old.config, new)
        heir = {src: dst for dst, src in enumerate(inherits) if src is not None}
        for i, worker in enumerate(workers):
            pos = old.position_of(worker.name)
            if pos is None:
                continue
            row = pos.stage * old.config.M + pos.rank
            weights[i] = w_table[row, col]
            tokens = kv_tokens.get(pos.replica, 0)
            if tokens and pos.replica in heir:
                kv[i] = np.where(col_replica == heir[pos.replica], kv_table[row, col] * tokens, 0)
        return weights, kv

    def map(self, workers: Sequence[Worker], old: Placement | None, new: ParallelConfig,
            kv_tokens: Mapping[int, int] | None = None,
            progress: Mapping[int, float] | None = None) -> MappingResult:
        """Place ``new`` on ``workers`` maximising reused bytes.

        ``workers`` are the devices available after the change (survivors and newcomers; not the
        ones leaving). ``old`` is the running placement (None at a cold start); ``kv_tokens`` and
        ``progress`` give each old replica's cached tokens and decoding progress (progress defaults
        to the cached tokens).
        """
        if len({w.name for w in workers}) != len(workers):
            raise PlanningError("worker names must be unique")
        if new.num_positions > len(workers):
            raise PlanningError(f"{new} needs {new.num_positions} workers, {len(workers)} given")
        kv_tokens = dict(kv_tokens or {})
        inherits = (inherit_replicas(old.config.D, new.D, progress or kv_tokens)
                    if old is not None else (None,) * new.D)
        weights, kv = self.reuse_matrix(workers, old, new, inherits, kv_tokens)
        score = _with_tie_break(weights + kv, workers, old, new, inherits)
        sizes = set(Counter(w.instance_id for w in workers).values())
        if len(sizes) == 1 and (group := sizes.pop()) > 1:
            rows, cols = _two_level(score, workers, group)
        else:
            rows, cols = linear_sum_assignment(score, maximize=True)
        by_position = dict(zip(cols.tolist(), rows.tolist(), strict=True))
        chosen = [by_position[p] for p in range(new.num_positions)]
        placement = Placement(new, tuple(workers[i].name for i in chosen))
        taken = set(chosen)
        return MappingResult(
            placement=placement,
            inherits=inherits,
            reused_weight_bytes=int(weights[chosen, range(new.num_positions)].sum()),
            reused_kv_bytes=int(kv[chosen, range(new.num_positions)].sum()),
            idle=tuple(w.name for i, w in enumerate(workers) if i not in taken),
        )


def _with_tie_break(reuse: np.ndarray, workers: Sequence[Worker], old: Placement | None,
                    new: ParallelConfig, inherits: Sequence[int | None]) -> np.ndarray:
    """Integer-exact score: reuse (in GCD units) scaled, plus 1 where a worker keeps its position."""
    unit = int(np.gcd.reduce(reuse.ravel())) if reuse.size else 0
    unit = unit or 1
    base = reuse // unit
    n_pos = new.num_positions
    scale = n_pos + 1
    if old is None or float(base.max(initial=0)) * scale * n_pos >= _EXACT:
        return base.astype(np.float64)
    heir = {src: dst for dst, src in enumerate(inherits) if src is not None}
    bonus = np.zeros_like(base)
    for i, worker in enumerate(workers):
        pos = old.position_of(worker.name)
        if pos is None or pos.replica not in heir or pos.stage >= new.P or pos.rank >= new.M:
            continue
        bonus[i, (heir[pos.replica] * new.P + pos.stage) * new.M + pos.rank] = 1
    return (base * scale + bonus).astype(np.float64)


def _two_level(score: np.ndarray, workers: Sequence[Worker],
               group: int) -> tuple[np.ndarray, np.ndarray]:
    """Match instances to slots of ``group`` consecutive positions, devices to offsets inside.

    Returns (worker rows, position columns) like `linear_sum_assignment`.
    """
    instances: dict[str, list[int]] = {}
    for i, w in enumerate(workers):
        instances.setdefault(w.instance_id, []).append(i)
    members = np.array(list(instances.values()))  # (I, G) worker rows per instance
    n_pos = score.shape[1]
    slots = -(-n_pos // group)
    padded = np.zeros((score.shape[0], slots * group))
    padded[:, :n_pos] = score
    # cube[i, s, k, j] = score of device k of instance i at offset j of slot s
    cube = padded[members].reshape(len(members), group, slots, group).transpose(0, 2, 1, 3)
    if group <= _PERMUTATION_LIMIT:
        perms = list(itertools.permutations(range(group)))
        pair = np.full(cube.shape[:2], -1.0)
        choice = np.zeros(cube.shape[:2], dtype=np.int64)
        for p, perm in enumerate(perms):  # running max over the G! inner matchings
            total = sum(cube[:, :, k, j] for k, j in enumerate(perm))
            better = total > pair
            pair = np.where(better, total, pair)
            choice[better] = p
        best_perm = np.array(perms)[choice]  # (I, S, G)
    else:
        pair = np.zeros((len(members), slots))
        best_perm = np.zeros((len(members), slots, group), dtype=np.int64)
        for i, s in np.ndindex(len(members), slots):
            r, c = linear_sum_assignment(cube[i, s], maximize=True)
            pair[i, s] = cube[i, s][r, c].sum()
            best_perm[i, s, r] = c
    inst, slot = linear_sum_assignment(pair, maximize=True)
    rows, cols = [], []
    for i, s in zip(inst.tolist(), slot.tolist(), strict=True):
        for k in range(group):
            column = s * group + int(best_perm[i, s, k])
            if column < n_pos:
                rows.append(int(members[i, k]))
                cols.append(column)
    return np.array(rows), np.array(cols)
