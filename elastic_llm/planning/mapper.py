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

**Cost.** Reuse is kept per worker and (stage, rank) column of a replica (`_Reuse`: N x P*M, not
N x D*P*M): weights are the same in every replica, and the KV and the tie-break bonus only touch
the one replica that inherits a worker's batch. The two-level inner matchings are computed once
per (instance type, slot type), an instance's type being the old (stage, rank) of its devices and
a slot's the (stage, rank) columns it covers, and exactly only for the few (instance, slot) pairs
that KV or the bonus touch. The scores fed to `linear_sum_assignment` are the very numbers a dense
device-level matrix would give, so the matching is unchanged.
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
        (`map` works on the per-column form, `_Reuse`; only single-device instances get a dense
        score matrix, which `linear_sum_assignment` needs.)
        """
        reuse = self._reuse(workers, old, new, inherits, kv_tokens)
        who = np.arange(len(workers))[:, None]
        where = np.arange(new.num_positions)[None, :]
        return reuse.weight_at(who, where), reuse.kv_at(who, where)

    def _reuse(self, workers: Sequence[Worker], old: Placement | None, new: ParallelConfig,
               inherits: Sequence[int | None], kv_tokens: Mapping[int, int]) -> _Reuse:
        """Per-worker, per-column reuse of ``new`` (see `_Reuse`)."""
        width, count = new.P * new.M, len(workers)
        if old is None:
            empty = np.zeros((count, width), dtype=np.int64)
            none = np.full(count, -1, dtype=np.int64)
            return _Reuse(width, new.num_positions, empty, empty, none, none, none)
        index = [old.index_of_worker(w.name) for w in workers]
        held = np.array([-1 if i is None else i for i in index], dtype=np.int64)
        old_width = old.config.P * old.config.M
        row = np.where(held >= 0, held % old_width, -1)  # old (stage, rank); -1 = zero row below
        replica = np.where(held >= 0, held // old_width, old.config.D)  # D: "no old replica"
        heir_of = np.full(old.config.D + 1, -1, dtype=np.int64)  # old replica -> new one
        for dst, src in enumerate(inherits):
            if src is not None:
                heir_of[src] = dst
        tokens_of = np.array([kv_tokens.get(r, 0) for r in range(old.config.D)] + [0],
                             dtype=np.int64)
        zero_row = np.zeros((1, width), dtype=np.int64)
        weights = np.vstack([self.algebra.weight_overlap(old.config, new), zero_row])[row]
        per_token = np.vstack([self.algebra.kv_overlap_per_token(old.config, new), zero_row])[row]
        tokens = tokens_of[replica]
        heir = np.where(tokens != 0, heir_of[replica], -1)
        kv = np.where((heir >= 0)[:, None], per_token * tokens[:, None], 0)
        stage, rank = row // old.config.M, row % old.config.M
        stays = (heir_of[replica] >= 0) & (stage < new.P) & (rank < new.M)
        home = np.where(stays, (heir_of[replica] * new.P + stage) * new.M + rank, -1)
        return _Reuse(width, new.num_positions, weights, kv, heir, home, row)

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
        reuse = self._reuse(workers, old, new, inherits, kv_tokens)
        scoring = _Scoring.of(reuse, bonus=old is not None)
        sizes = set(Counter(w.instance_id for w in workers).values())
        if len(sizes) == 1 and (group := sizes.pop()) > 1:
            rows, cols = _two_level(reuse, scoring, workers, group)
        else:
            rows, cols = linear_sum_assignment(
                scoring.score(reuse, np.arange(len(workers))[:, None],
                              np.arange(new.num_positions)[None, :]), maximize=True)
        chosen = np.empty(new.num_positions, dtype=np.int64)
        chosen[cols] = rows
        placement = Placement(new, tuple(workers[i].name for i in chosen.tolist()))
        taken = set(chosen.tolist())
        where = np.arange(new.num_positions)
        return MappingResult(
            placement=placement,
            inherits=inherits,
            reused_weight_bytes=int(reuse.weight_at(chosen, where).sum()),
            reused_kv_bytes=int(reuse.kv_at(chosen, where).sum()),
            idle=tuple(w.name for i, w in enumerate(workers) if i not in taken),
        )


@dataclass(frozen=True)
class _Reuse:
    """What each worker already holds of the new positions, kept per (stage, rank) column.

    New position ``p`` is column ``p % width`` of replica ``p // width``. Worker ``i`` holds
    ``weights[i, c]`` bytes of column ``c`` in every replica, plus ``kv[i, c]`` bytes of KV cache in
    replica ``heir[i]`` only (the one inheriting its old batch; -1: none, or no cached tokens).
    ``home[i]`` is the position it keeps when the shape allows (-1: none) and ``row[i]`` its old
    (stage, rank) row (-1: a newcomer); workers of equal ``row`` have equal ``weights`` rows.
    """

    width: int  #: positions per new replica (P * M)
    positions: int  #: positions of the new configuration (D * P * M)
    weights: np.ndarray  #: (workers, width) int64
    kv: np.ndarray  #: (workers, width) int64
    heir: np.ndarray  #: (workers,) int64
    home: np.ndarray  #: (workers,) int64
    row: np.ndarray  #: (workers,) int64

    def weight_at(self, who: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Weight bytes worker ``who`` holds of position ``where`` (broadcast; 0 past the end)."""
        inside = where < self.positions
        return np.where(inside, self.weights[who, where % self.width], 0)

    def kv_at(self, who: np.ndarray, where: np.ndarray) -> np.ndarray:
        """KV bytes worker ``who`` holds of position ``where`` (broadcast; 0 past the end)."""
        mine = (where < self.positions) & (where // self.width == self.heir[who])
        return np.where(mine, self.kv[who, where % self.width], 0)

    def values(self) -> np.ndarray:
        """Every value the dense (workers x positions) reuse matrix takes, zeros aside."""
        with_kv = self.heir >= 0
        plain = self.weights if self.positions > self.width else self.weights[~with_kv]
        return np.concatenate([plain.ravel(), (self.weights + self.kv)[with_kv].ravel()])


@dataclass(frozen=True)
class _Scoring:
    """The integer-exact score of the module docstring: reuse in GCD units, times ``factor``,
    plus 1 at a worker's ``home`` when ``bonus`` (else ``factor`` is 1)."""

    unit: int  #: GCD of all reuse values (1 when all are zero)
    factor: int  #: positions + 1 with the bonus, 1 without
    bonus: bool  #: whether the stay-in-place bonus is added

    @classmethod
    def of(cls, reuse: _Reuse, bonus: bool) -> _Scoring:
        """The scoring for ``reuse``; ``bonus`` False at a cold start. The bonus is dropped when
        the scaled scores would not be exact in float64."""
        values = reuse.values()
        unit = int(np.gcd.reduce(values)) if values.size else 0
        unit = unit or 1
        scale = reuse.positions + 1
        top = int(values.max(initial=0)) // unit
        exact = float(top) * scale * reuse.positions < _EXACT
        return cls(unit, scale, True) if bonus and exact else cls(unit, 1, False)

    def score(self, reuse: _Reuse, who: np.ndarray, where: np.ndarray,
              plain: bool = False) -> np.ndarray:
        """Float64 score of worker ``who`` at position ``where`` (broadcast; 0 past the end).
        ``plain``: weights only, no KV and no bonus (exact where neither applies)."""
        total = reuse.weight_at(who, where)
        if not plain:
            total = total + reuse.kv_at(who, where)
        value = total // self.unit * self.factor
        if self.bonus and not plain:
            value = value + (where == reuse.home[who])
        return value.astype(np.float64)


def _two_level(reuse: _Reuse, scoring: _Scoring, workers: Sequence[Worker],
               group: int) -> tuple[np.ndarray, np.ndarray]:
    """Match instances to slots of ``group`` consecutive positions, devices to offsets inside.

    Returns (worker rows, position columns) like `linear_sum_assignment`.
    """
    instances: dict[str, list[int]] = {}
    for i, w in enumerate(workers):
        instances.setdefault(w.instance_id, []).append(i)
    members = np.array(list(instances.values()))  # (I, G) worker rows per instance
    slots = -(-reuse.positions // group)
    offsets = np.arange(group)
    where = np.arange(slots)[:, None] * group + offsets  # (S, G) positions of each slot
    # types: instances whose devices held the same old (stage, rank)s, slots of the same columns
    _, inst_rep, inst_type = np.unique(reuse.row[members], axis=0, return_index=True,
                                       return_inverse=True)
    columns = np.where(where < reuse.positions, where % reuse.width, -1)
    _, slot_rep, slot_type = np.unique(columns, axis=0, return_index=True, return_inverse=True)
    inst_type, slot_type = inst_type.ravel(), slot_type.ravel()
    # cube[a, b, k, j] = plain score of device k of instance type a at offset j of slot type b
    cube = scoring.score(reuse, members[inst_rep][:, None, :, None],
                         where[slot_rep][None, :, None, :], plain=True)
    type_pair, type_perm = _inner_best(cube.reshape(-1, group, group))
    type_pair = type_pair.reshape(len(inst_rep), len(slot_rep))
    type_perm = type_perm.reshape(len(inst_rep), len(slot_rep), group)
    pair = type_pair[inst_type][:, slot_type]
    # (instance, slot) pairs that a device's inherited KV or its stay bonus touches: exact cubes
    sp_inst, sp_slot = _touched(reuse, scoring, members, group, slots)
    special = np.full(pair.shape, -1, dtype=np.int64)
    special[sp_inst, sp_slot] = np.arange(len(sp_inst))
    sp_pair, sp_perm = _inner_best(scoring.score(
        reuse, members[sp_inst][:, :, None], where[sp_slot][:, None, :]))
    pair[sp_inst, sp_slot] = sp_pair
    inst, slot = linear_sum_assignment(pair, maximize=True)
    perm = type_perm[inst_type[inst], slot_type[slot]]
    touched = special[inst, slot]
    hit = touched >= 0
    perm[hit] = sp_perm[touched[hit]]
    cols = slot[:, None] * group + perm
    rows = members[inst]
    inside = cols < reuse.positions
    return rows[inside], cols[inside]


def _touched(reuse: _Reuse, scoring: _Scoring, members: np.ndarray, group: int,
             slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(instances, slots), without repeats: the slots overlapping the inherited replica of any of
    an instance's devices, and with the bonus the slot of any device's home position."""
    heir = reuse.heir[members]
    inst, dev = np.nonzero(heir >= 0)
    first = heir[inst, dev] * reuse.width // group
    last = ((heir[inst, dev] + 1) * reuse.width - 1) // group
    counts = last - first + 1
    ends = np.cumsum(counts)
    step = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
    keys = [np.repeat(inst, counts) * slots + np.repeat(first, counts) + step]
    if scoring.bonus:
        home = reuse.home[members]
        inst, dev = np.nonzero(home >= 0)
        keys.append(inst * slots + home[inst, dev] // group)
    unique = np.unique(np.concatenate(keys))
    return unique // slots, unique % slots


def _inner_best(cube: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best matching of each (G, G) score matrix of ``cube`` (n, G, G): (its score, device k's
    offset). All G! permutations for G <= 5 (the first best in `itertools` order), else LSA."""
    count, group = cube.shape[0], cube.shape[-1]
    if group <= _PERMUTATION_LIMIT:
        perms = list(itertools.permutations(range(group)))
        pair = np.full(count, -1.0)
        choice = np.zeros(count, dtype=np.int64)
        for p, perm in enumerate(perms):  # running max over the G! inner matchings
            total = sum(cube[:, k, j] for k, j in enumerate(perm))
            better = total > pair
            pair = np.where(better, total, pair)
            choice[better] = p
        return pair, np.array(perms, dtype=np.int64)[choice]
    pair = np.zeros(count)
    best = np.zeros((count, group), dtype=np.int64)
    for n in range(count):
        r, c = linear_sum_assignment(cube[n], maximize=True)
        pair[n] = cube[n][r, c].sum()
        best[n, r] = c
    return pair, best
