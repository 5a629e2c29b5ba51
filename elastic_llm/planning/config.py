"""The nouns every planner shares: parallel configurations, positions, placements, workers.

A `ParallelConfig` (D replicas x P pipeline stages x M tensor ranks, batch B per replica) defines
``D * P * M`` positions. A `Position` is one (replica, stage, rank) slot; a `Placement` says which
worker sits at each position. Positions are numbered in the canonical order replica-major, then
stage, then rank: ``index = (replica * P + stage) * M + rank``. Tensor groups (the M ranks of one
stage) are therefore contiguous, which is what the two-level device mapper relies on.

Layers are split over stages as evenly as possible, the first ``L % P`` stages taking one extra
layer, so the busiest stage has ``ceil(L / P)`` layers (SpotServe's ``f``) and no stage is empty.
"""

from __future__ import annotations

import functools
import math

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from elastic_llm.planning.errors import PlanningError


@dataclass(frozen=True)
class ParallelConfig:
    """One way to run a model on a set of devices. Validated on construction, never mutated.

    The field names follow the SpotServe paper (and DESIGN.md): D, P, M, B.
    """

    D: int  #: data-parallel replicas
    P: int  #: pipeline stages per replica
    M: int  #: tensor-parallel ranks per stage
    B: int  #: requests decoded together in one replica (its batch size)
    prefill_micro_batches: int = 1  #: micro-batches the batch is split into for the prefill (m1)
    decode_micro_batches: int = 1  #: micro-batches the batch is split into for decoding (m2)

    def __post_init__(self) -> None:
        for name in ("D", "P", "M", "B", "prefill_micro_batches", "decode_micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanningError(f"ParallelConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("prefill_micro_batches", "decode_micro_batches"):
            if self.B % getattr(self, name):
                raise PlanningError(f"ParallelConfig.{name} must divide B={self.B}")

    @property
    def devices_per_replica(self) -> int:
        """Devices one replica occupies (P * M)."""
        return self.P * self.M

    @property
    def num_positions(self) -> int:
        """Devices the whole configuration occupies (D * P * M)."""
        return self.D * self.P * self.M

    @property
    def shape(self) -> tuple[int, int]:
        """(P, M): what a replica looks like; a change of shape forces weights to move."""
        return (self.P, self.M)

    def positions(self) -> Iterator[Position]:
        """Every position in canonical order (replica, then stage, then rank)."""
        for replica in range(self.D):
            for stage in range(self.P):
                for rank in range(self.M):
                    yield Position(replica, stage, rank)

    def index_of(self, position: Position) -> int:
        """Canonical index of ``position`` (raises `PlanningError` if it is outside the config)."""
        if not (0 <= position.replica < self.D and 0 <= position.stage < self.P
                and 0 <= position.rank < self.M):
            raise PlanningError(f"{position} is not a position of {self}")
        return (position.replica * self.P + position.stage) * self.M + position.rank

    def position_at(self, index: int) -> Position:
        """Inverse of `index_of`."""
        if not 0 <= index < self.num_positions:
            raise PlanningError(f"position index {index} outside 0..{self.num_positions - 1}")
        replica_stage, rank = divmod(index, self.M)
        replica, stage = divmod(replica_stage, self.P)
        return Position(replica, stage, rank)

    def stage_layers(self, num_layers: int, stage: int, edges: tuple[float, float] = (0.0, 0.0)) -> range:
        """Transformer layers that ``stage`` runs (cost-balanced split, see `stage_layer_range`)."""
        return stage_layer_range(num_layers, self.P, stage, edges)

    def max_stage_layers(self, num_layers: int) -> int:
        """Layers of the busiest stage: ceil(L / P), SpotServe's ``f``."""
        return -(-num_layers // self.P)


def stage_layer_range(num_layers: int, stages: int, stage: int,
                      edges: tuple[float, float] = (0.0, 0.0)) -> range:
    """Layers of ``stage`` when ``num_layers`` are split over ``stages`` contiguously, balancing
    per-stage cost: each layer costs 1, the first stage also ``edges[0]`` (embedding) and the last
    also ``edges[1]`` (final norm + LM head), in layer units. The busiest stage is as cheap as it can
    be; among such splits earlier stages take the extra layers (with ``edges == (0, 0)`` that is the
    even split, first stages one layer more).

    Raises `PlanningError` when a stage would be empty (more stages than layers).
    """
    if not 0 <= stage < stages:
        raise PlanningError(f"stage {stage} outside 0..{stages - 1}")
    bounds = stage_bounds(num_layers, stages, edges)
    return range(bounds[stage], bounds[stage + 1])


@functools.lru_cache(maxsize=4096)
def stage_bounds(num_layers: int, stages: int, edges: tuple[float, float] = (0.0, 0.0)) -> tuple[int, ...]:
    """First layer of every stage, then ``num_layers`` (see `stage_layer_range`)."""
    if stages > num_layers:
        raise PlanningError(f"{stages} pipeline stages exceed the model's {num_layers} layers")
    if stages < 1 or min(edges) < 0:
        raise PlanningError("need at least one stage and non-negative edge costs")
    if edges == (0.0, 0.0):  # the even split, first stages one layer more
        base, extra = divmod(num_layers, stages)
        return tuple(k * base + min(k, extra) for k in range(stages + 1))
    first, last = edges

    def cost(start: int, stop: int) -> float:
        return (stop - start) + (first if start == 0 else 0.0) + (last if stop == num_layers else 0.0)

    # best[k][i]: (busiest stage, sum of squared stage costs) splitting layers [i, L) into k stages
    inf = (math.inf, math.inf)
    best = [[inf] * (num_layers + 1) for _ in range(stages + 1)]
    best[0][num_layers] = (0.0, 0.0)
    for k in range(1, stages + 1):
        for i in range(num_layers - k, -1, -1):
            for j in range(i + 1, num_layers - k + 2):
                rest = best[k - 1][j]
                if rest == inf:
                    continue
                here = cost(i, j)
                option = (max(here, rest[0]), here * here + rest[1])
                if option < best[k][i]:
                    best[k][i] = option
    bounds = [0]
    for k in range(stages, 1, -1):  # earlier stages take the larger share among equal splits
        start, target = bounds[-1], best[k][bounds[-1]]
        bounds.append(max(j for j in range(start + 1, num_layers - k + 2)
                          if best[k - 1][j] != inf and _close(
                              (max(cost(start, j), best[k - 1][j][0]),
                               cost(start, j) ** 2 + best[k - 1][j][1]), target)))
    bounds.append(num_layers)
    return tuple(bounds)


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, order=True)
class Position:
    """One slot of a configuration: tensor ``rank`` of pipeline ``stage`` of data ``replica``."""

    replica: int  #: data-parallel replica index, 0..D-1
    stage: int  #: pipeline stage index, 0..P-1
    rank: int  #: tensor-parallel rank, 0..M-1


@dataclass(frozen=True)
class Worker:
    """A device the planners may use: one Dask worker standing for one GPU.

    ``instance`` groups devices of one multi-GPU machine (they are preempted together and share a
    fast intra-instance link); single-device instances use the worker name.
    """

    name: str  #: Dask worker address or any unique id
    instance: str = ""  #: id of the machine holding the device ("" = same as ``name``)
    memory_bytes: int = 1 << 62  #: bytes of weights + KV the device may hold at any moment
    bandwidth: float = 6.25e9  #: bytes/s of the device's share of the network link (50 Gbps)

    def __post_init__(self) -> None:
        if not self.name:
            raise PlanningError("Worker.name must be non-empty")
        if self.memory_bytes < 0 or self.bandwidth <= 0:
            raise PlanningError("Worker.memory_bytes must be >= 0 and bandwidth > 0")

    @property
    def instance_id(self) -> str:
        """The instance the device belongs to."""
        return self.instance or self.name


@dataclass(frozen=True)
class Placement:
    """Which worker sits at each position of ``config``: ``workers[i]`` holds position ``i``.

    Built by the device mapper; read by the migration planner and the controller.
    """

    config: ParallelConfig  #: the configuration being placed
    workers: tuple[str, ...]  #: worker name per canonical position index
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.workers) != self.config.num_positions:
            raise PlanningError(
                f"placement names {len(self.workers)} workers for {self.config.num_positions} positions"
            )
        if len(set(self.workers)) != len(self.workers):
            raise PlanningError("a worker appears at two positions of one placement")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.workers)})

    @classmethod
    def from_mapping(cls, config: ParallelConfig, mapping: dict[Position, str]) -> Placement:
        """Build from ``{position: worker}`` covering every position of ``config``."""
        try:
            return cls(config, tuple(mapping[p] for p in config.positions()))
        except KeyError as missing:
            raise PlanningError(f"no worker given for position {missing}") from None

    def worker_at(self, position: Position) -> str:
        """The worker at ``position``."""
        return self.workers[self.config.index_of(position)]

    def position_of(self, worker: str) -> Position | None:
        """The position ``worker`` holds, or None when it has none."""
        index = self._index.get(worker)
        return None if index is None else self.config.position_at(index)

    def index_of_worker(self, worker: str) -> int | None:
        """Canonical index of the position ``worker`` holds, or None when it has none."""
        return self._index.get(worker)

    def items(self) -> Iterator[tuple[Position, str]]:
        """(position, worker) pairs in canonical order."""
        yield from zip(self.config.positions(), self.workers)

    @cached_property
    def as_dict(self) -> dict[Position, str]:
        """``{position: worker}`` (a fresh dict built once)."""
        return dict(self.items())


@dataclass(frozen=True)
class Workload:
    """The request shape the cost model and the optimizer plan for."""

    input_len: int = 512  #: prompt tokens per request
    output_len: int = 128  #: generated tokens per request
    arrival_rate: float = 0.0  #: requests per second the fleet must sustain

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.arrival_rate < 0:
            raise PlanningError("Workload needs input_len >= 1, output_len >= 1, arrival_rate >= 0")

    @property
    def context_len(self) -> int:
        """Tokens of KV a request holds when it finishes (input + output)."""
        return self.input_len + self.output_len
