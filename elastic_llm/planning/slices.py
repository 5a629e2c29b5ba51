"""Slice algebra: what a position holds, in bytes, and how much two positions share.

A position holds, for every layer of its stage, one contiguous interval of each tensor-parallel
*part*, plus the whole of each replicated part. The intervals follow DeepSpeed-inference AutoTP's
layout (`shard_sizes` reproduces ``deepspeed.module_inject.tp_shard.get_shard_size_list``):

============  =========================================  ==================  =====================
part          what one unit is                           units per layer     split over M ranks
============  =========================================  ==================  =====================
``Q``         a row of q_proj + the matching o_proj col  num_heads*head_dim  by KV-head groups
``KV``        a row of k_proj + the same row of v_proj   kv_heads*head_dim   by KV-head groups
``MLP``       a row of gate/up (fc1) + col of down (fc2) intermediate        in 64-wide granules
``NORM``      the layer's norms (replicated)             1                   every rank: all of it
``EMBED``     the token embedding (stage 0, replicated)  1                   every rank: all of it
``HEAD``      a vocabulary row of the LM head (last st.)  vocab              in 64-wide granules
``FINAL_NORM`` the final norm (last stage, replicated)   1                   every rank: all of it
``KV_CACHE``  one key+value element per cached token     kv_heads*head_dim   by KV-head groups
============  =========================================  ==================  =====================

The per-layer parts add up exactly to ``ModelSpec.params_per_layer``. AutoTP keeps the embedding
whole and shards the LM head into a separate copy, so a tied LM head costs memory on the last
stage; that is what we model. The KV cache of a batch of interrupted requests is reusable only at
the positions of the new replica that inherits that batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Position, stage_layer_range
from elastic_llm.planning.errors import PlanningError

#: DeepSpeed AutoTP's granule for splits that are not head-granular (``tp_shard.tp_grain_size``).
TP_GRAIN = 64
_MEMO_LIMIT = 1 << 16  #: tuples whose byte size `SliceAlgebra.tuple_bytes` remembers at most


class Part(str, Enum):
    """A kind of tensor a position holds (see the module table)."""

    EMBED = "embed"
    Q = "q"
    KV = "kv"
    MLP = "mlp"
    NORM = "norm"
    HEAD = "head"
    FINAL_NORM = "final_norm"
    KV_CACHE = "kv_cache"


#: parts sharded over the tensor ranks of a transformer layer
LAYER_SHARDED_PARTS: tuple[Part, ...] = (Part.Q, Part.KV, Part.MLP)


def shard_sizes(total: int, degree: int, num_groups: int | None = None,
                granule: int = TP_GRAIN) -> tuple[int, ...]:
    """Elements each of ``degree`` tensor ranks gets of a dimension of ``total`` elements.

    Mirrors DeepSpeed AutoTP (``tp_shard.get_shard_size``): when ``total`` divides into
    ``num_groups`` head groups (attention: the KV-head count), rank r gets
    ``num_groups // degree`` groups plus one more if ``r < num_groups % degree``, so ranks can be
    uneven or empty (9 heads / 3 KV heads, degree 4: q ``[192, 192, 192, 0]``). Otherwise the
    dimension is split in ``granule``-wide granules the same way (MLP, LM head). DeepSpeed drops a
    trailing partial granule; we give it to the last rank so that the shards tile the dimension.
    """
    if total < 1 or degree < 1:
        raise PlanningError("shard_sizes needs total >= 1 and degree >= 1")
    if num_groups and total % num_groups == 0:
        per_group = total // num_groups
        return tuple(per_group * (num_groups // degree + (1 if r < num_groups % degree else 0))
                     for r in range(degree))
    if total >= granule:
        grains = total // granule
        sizes = [granule * (grains // degree + (1 if r < grains % degree else 0))
                 for r in range(degree)]
        sizes[-1] += total - grains * granule
        return tuple(sizes)
    return tuple(total // degree + (1 if r < total % degree else 0) for r in range(degree))


@dataclass(frozen=True, order=True)
class Slice:
    """A contiguous piece of one part: units ``[start, stop)`` of ``part`` in ``layer``.

    ``layer`` is -1 for the embedding and ``num_layers`` for the LM head and final norm, so that
    sorting by layer is front-to-back order. KV-cache slices name the ``batch`` (the old replica
    whose interrupted requests own the cache) and its cached ``tokens``; weight slices leave both
    at their defaults.
    """

    layer: int  #: transformer layer, -1 = embedding, num_layers = LM head / final norm
    part: Part  #: which tensor
    start: int  #: first unit
    stop: int  #: one past the last unit
    batch: int = -1  #: KV_CACHE only: old replica whose batch this cache belongs to
    tokens: int = 0  #: KV_CACHE only: cached tokens (sum over the batch's requests)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise PlanningError(f"empty or negative slice [{self.start}, {self.stop})")
        if (self.part is Part.KV_CACHE) != (self.batch >= 0):
            raise PlanningError("exactly the KV_CACHE slices name a batch")

    @property
    def key(self) -> tuple[int, Part, int]:
        """(layer, part, batch): slices with one key are intervals of the same tensor."""
        return (self.layer, self.part, self.batch)

    @property
    def is_kv(self) -> bool:
        """True for KV-cache slices."""
        return self.part is Part.KV_CACHE

    def with_range(self, start: int, stop: int) -> Slice:
        """The same tensor, units ``[start, stop)``."""
        return Slice(self.layer, self.part, start, stop, self.batch, self.tokens)


class SliceAlgebra:
    """Byte sizes, shard intervals and overlaps of positions for one model.

    Pure and cheap to build; its methods are cached on (M, rank) and (P, stage).
    """

    def __init__(self, model: ModelSpec) -> None:
        """Bind the algebra to ``model``'s shapes."""
        self.model = model
        h, bpp = model.hidden_size, model.bytes_per_param
        bias = 1 if model.attention_bias else 0
        self._unit_bytes = {
            Part.Q: (2 * h + bias) * bpp,
            Part.KV: (2 * h + 2 * bias) * bpp,
            Part.MLP: (3 if model.gated_mlp else 2) * h * bpp,
            Part.NORM: 2 * h * bpp,
            Part.EMBED: model.vocab_size * h * bpp,
            Part.HEAD: h * bpp,
            Part.FINAL_NORM: h * bpp,
            Part.KV_CACHE: 2 * bpp,
        }
        self._units = {
            Part.Q: model.q_size, Part.KV: model.kv_size, Part.MLP: model.intermediate_size,
            Part.NORM: 1, Part.EMBED: 1, Part.HEAD: model.vocab_size, Part.FINAL_NORM: 1,
            Part.KV_CACHE: model.kv_size,
        }
        self.interval = lru_cache(maxsize=None)(self._interval)  # type: ignore[method-assign]
        self._weights = lru_cache(maxsize=4096)(self._weight_slices)
        self._kv = lru_cache(maxsize=65536)(self._kv_slices)
        self._overlaps: dict[tuple[str, int, int, int, int], np.ndarray] = {}
        self._tuple_bytes: dict[int, tuple[tuple[Slice, ...], int]] = {}

    # ------------------------------------------------------------------ sizes and intervals
    def unit_bytes(self, part: Part) -> int:
        """Bytes of one unit of ``part`` (per cached token for KV_CACHE)."""
        return self._unit_bytes[part]

    def units(self, part: Part) -> int:
        """Units ``part`` has in total (per layer for the layer parts)."""
        return self._units[part]

    def nbytes(self, piece: Slice) -> int:
        """Bytes of ``piece`` (KV slices scale with their cached tokens)."""
        size = (piece.stop - piece.start) * self._unit_bytes[piece.part]
        return size * piece.tokens if piece.is_kv else size

    def total_bytes(self, pieces: Iterable[Slice]) -> int:
        """Bytes of all ``pieces`` together (the sum of `nbytes`)."""
        unit, kv = self._unit_bytes, Part.KV_CACHE
        return sum((s.stop - s.start) * unit[s.part] * (s.tokens if s.part is kv else 1)
                   for s in pieces)

    def tuple_bytes(self, pieces: tuple[Slice, ...]) -> int:
        """`total_bytes` of a tuple, remembered per tuple object: the tuples of `weight_slices`
        and `kv_slices` are shared, so a planner kept between reconfigurations sums each once.
        The memo holds the tuple (its identity cannot be reused) and is emptied when full."""
        found = self._tuple_bytes.get(id(pieces))
        if found is None:
            if len(self._tuple_bytes) >= _MEMO_LIMIT:
                self._tuple_bytes.clear()
            found = self._tuple_bytes[id(pieces)] = (pieces, self.total_bytes(pieces))
        return found[1]

    def _interval(self, part: Part, degree: int, rank: int) -> tuple[int, int]:
        """Units ``[start, stop)`` of ``part`` that tensor ``rank`` of ``degree`` holds."""
        if part in (Part.NORM, Part.EMBED, Part.FINAL_NORM):
            return (0, 1)
        groups = None if part in (Part.MLP, Part.HEAD) else self.model.num_kv_heads
        sizes = shard_sizes(self._units[part], degree, groups)
        start = sum(sizes[:rank])
        return (start, start + sizes[rank])

    def interval_table(self, part: Part, degree: int) -> np.ndarray:
        """(degree, 2) array of every rank's ``[start, stop)`` for ``part``."""
        return np.array([self.interval(part, degree, r) for r in range(degree)], dtype=np.int64)

    # ------------------------------------------------------------------ what a position holds
    def position_slices(self, config: ParallelConfig, position: Position,
                        kv_batch: int = -1, kv_tokens: int = 0) -> list[Slice]:
        """Every slice ``position`` holds under ``config``: its weights, then its share of the KV
        cache of batch ``kv_batch`` (``kv_tokens`` cached tokens) when ``kv_tokens > 0``."""
        return [*self.weight_slices(config, position),
                *self.kv_slices(config, position, kv_batch, kv_tokens)]

    def weight_slices(self, config: ParallelConfig, position: Position) -> tuple[Slice, ...]:
        """The weight slices of ``position`` (embedding, layers front to back, LM head). The tuple
        is cached and shared: positions with equal (P, M, stage, rank) get the same object."""
        return self._weights(config.P, config.M, position.stage, position.rank)

    def kv_slices(self, config: ParallelConfig, position: Position, batch: int,
                  tokens: int) -> tuple[Slice, ...]:
        """The position's share of batch ``batch``'s KV cache (empty when ``tokens`` is 0 or the
        batch is -1); cached and shared like `weight_slices`."""
        if tokens <= 0 or batch < 0:
            return ()
        return self._kv(config.P, config.M, position.stage, position.rank, batch, tokens)

    def _weight_slices(self, stages: int, degree: int, stage: int, rank: int) -> tuple[Slice, ...]:
        """Weight slices of (stage, rank) with ``stages`` x ``degree`` per replica (cached)."""
        L = self.model.num_layers
        out: list[Slice] = []
        if stage == 0:
            out.append(Slice(-1, Part.EMBED, 0, 1))
        for layer in stage_layer_range(L, stages, stage, self.model.stage_cost_edges):
            for part in (*LAYER_SHARDED_PARTS, Part.NORM):
                start, stop = self.interval(part, degree, rank)
                if stop > start:
                    out.append(Slice(layer, part, start, stop))
        if stage == stages - 1:
            start, stop = self.interval(Part.HEAD, degree, rank)
            if stop > start:
                out.append(Slice(L, Part.HEAD, start, stop))
            out.append(Slice(L, Part.FINAL_NORM, 0, 1))
        return tuple(out)

    def _kv_slices(self, stages: int, degree: int, stage: int, rank: int, batch: int,
                   tokens: int) -> tuple[Slice, ...]:
        """KV-cache slices of (stage, rank) for ``batch`` with ``tokens`` cached (cached)."""
        start, stop = self.interval(Part.KV_CACHE, degree, rank)
        if stop <= start:
            return ()
        return tuple(Slice(layer, Part.KV_CACHE, start, stop, batch, tokens)
                     for layer in stage_layer_range(self.model.num_layers, stages, stage,
                                                    self.model.stage_cost_edges))

    def weight_bytes(self, config: ParallelConfig, stage: int, rank: int) -> int:
        """Weight bytes of the position (any replica, ``stage``, ``rank``) under ``config``."""
        return int(self.weight_overlap(config, config)[stage * config.M + rank,
                                                       stage * config.M + rank])

    def kv_bytes_per_token(self, config: ParallelConfig, stage: int, rank: int) -> int:
        """KV-cache bytes one cached token costs the position (stage, rank) under ``config``."""
        start, stop = self.interval(Part.KV_CACHE, config.M, rank)
        layers = len(config.stage_layers(self.model.num_layers, stage, self.model.stage_cost_edges))
        return layers * (stop - start) * self._unit_bytes[Part.KV_CACHE]

    # ------------------------------------------------------------------ overlaps (what KM maximises)
    def _stage_overlap(self, old: ParallelConfig, new: ParallelConfig) -> np.ndarray:
        """(P_old, P_new) counts of transformer layers two stages share."""
        L = self.model.num_layers
        edges = self.model.stage_cost_edges
        a = np.array([[r.start, r.stop] for r in (old.stage_layers(L, s, edges) for s in range(old.P))])
        b = np.array([[r.start, r.stop] for r in (new.stage_layers(L, s, edges) for s in range(new.P))])
        return _interval_overlap(a, b)

    def _rank_overlap(self, part: Part, old_m: int, new_m: int) -> np.ndarray:
        """(M_old, M_new) units of ``part`` two tensor ranks share."""
        return _interval_overlap(self.interval_table(part, old_m), self.interval_table(part, new_m))

    def weight_overlap(self, old: ParallelConfig, new: ParallelConfig) -> np.ndarray:
        """Weight bytes shared by (stage, rank) of ``old`` and (stage, rank) of ``new``.

        Returns a read-only int64 array of shape (P_old * M_old, P_new * M_new), indexed by
        ``stage * M + rank`` on both sides. Weights are identical in every replica, so the replica
        does not matter.
        """
        key = ("w", old.P, old.M, new.P, new.M)
        if key not in self._overlaps:
            self._overlaps[key] = _frozen(self._weight_overlap(old, new))
        return self._overlaps[key]

    def _weight_overlap(self, old: ParallelConfig, new: ParallelConfig) -> np.ndarray:
        per_layer = sum(self._rank_overlap(p, old.M, new.M) * self._unit_bytes[p]
                        for p in LAYER_SHARDED_PARTS) + self._unit_bytes[Part.NORM]
        layers = self._stage_overlap(old, new)
        total = layers[:, None, :, None] * per_layer[None, :, None, :]
        total[0, :, 0, :] += self._unit_bytes[Part.EMBED]
        head = self._rank_overlap(Part.HEAD, old.M, new.M) * self._unit_bytes[Part.HEAD]
        total[old.P - 1, :, new.P - 1, :] += head + self._unit_bytes[Part.FINAL_NORM]
        return total.reshape(old.P * old.M, new.P * new.M)

    def kv_overlap_per_token(self, old: ParallelConfig, new: ParallelConfig) -> np.ndarray:
        """KV-cache bytes per cached token shared by (stage, rank) of ``old`` and of ``new``,
        assuming the new position's replica inherits the old position's batch. Same shape and
        indexing as `weight_overlap`."""
        key = ("kv", old.P, old.M, new.P, new.M)
        if key not in self._overlaps:
            per_layer = (self._rank_overlap(Part.KV_CACHE, old.M, new.M)
                         * self._unit_bytes[Part.KV_CACHE])
            layers = self._stage_overlap(old, new)
            total = layers[:, None, :, None] * per_layer[None, :, None, :]
            self._overlaps[key] = _frozen(total.reshape(old.P * old.M, new.P * new.M))
        return self._overlaps[key]


def _frozen(array: np.ndarray) -> np.ndarray:
    """``array`` marked read-only (it is cached and shared)."""
    array.setflags(write=False)
    return array


def _interval_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise overlap lengths of intervals ``a`` (n, 2) and ``b`` (m, 2) as an (n, m) array."""
    lo = np.maximum(a[:, None, 0], b[None, :, 0])
    hi = np.minimum(a[:, None, 1], b[None, :, 1])
    return np.maximum(hi - lo, 0).astype(np.int64)


def subtract_interval(start: int, stop: int, cut_start: int, cut_stop: int) -> list[tuple[int, int]]:
    """Parts of ``[start, stop)`` outside ``[cut_start, cut_stop)`` (zero, one or two intervals)."""
    pieces = []
    if cut_start > start:
        pieces.append((start, min(stop, cut_start)))
    if cut_stop < stop:
        pieces.append((max(start, cut_stop), stop))
    return [(a, b) for a, b in pieces if b > a]
