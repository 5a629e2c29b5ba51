"""Partition: which layers and which tensor shard the process at (stage, rank) of a P x M replica holds.

Stage p runs the contiguous layer range `stage_layer_range(L, P, p, spec.stage_cost_edges)`: the
planning core's split balanced by per-stage cost, the LM head counted on the last stage, so the
runtime holds exactly what the slice algebra assumes. The first stage also holds the embedding, the
last the final norm and the LM head. Tensor rank m holds
DeepSpeed AutoTP's shard (`planning.slices.shard_sizes`): query heads by KV-head groups, KV heads
head-granular and uneven where they do not divide (ranks beyond the KV-head count hold no
attention at all, as AutoTP gives them), MLP columns and LM-head vocabulary rows in 64-wide
granules with the remainder on the last rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_llm.engine.replica.errors import ReplicaConfigError
from elastic_llm.model.layers import TensorShard
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Position, stage_layer_range
from elastic_llm.planning.errors import PlanningError
from elastic_llm.planning.slices import Part, SliceAlgebra


@dataclass(frozen=True)
class ShardLayout:
    """What one process of a replica holds: a layer range x a tensor shard."""

    stages: int  #: pipeline stages of the replica (P)
    degree: int  #: tensor ranks per stage (M)
    stage: int  #: this process's stage
    rank: int  #: this process's tensor rank
    layers: range  #: transformer layers held
    shard: TensorShard  #: heads, KV heads, MLP columns and LM-head rows held

    @property
    def has_embedding(self) -> bool:
        """The first stage embeds the token ids."""
        return self.stage == 0

    @property
    def has_head(self) -> bool:
        """The last stage applies the final norm and the LM head."""
        return self.stage == self.stages - 1

    @property
    def position(self) -> Position:
        """The planning core's position of this process (replica 0)."""
        return Position(0, self.stage, self.rank)

    @property
    def index(self) -> int:
        """Canonical index stage * M + rank (its rank in the replica's process group)."""
        return self.stage * self.degree + self.rank

    def stage_peer(self, stage: int) -> int:
        """Group rank of the process with this tensor rank on pipeline stage `stage`."""
        return stage * self.degree + self.rank


def tensor_shard(spec: ModelSpec, degree: int, rank: int) -> TensorShard:
    """AutoTP's shard of tensor rank `rank` of `degree` (through the planning core's algebra)."""
    algebra = SliceAlgebra(spec)
    d = spec.head_dim
    q_start, q_stop = algebra.interval(Part.Q, degree, rank)
    kv_start, kv_stop = algebra.interval(Part.KV, degree, rank)
    return TensorShard((q_start // d, q_stop // d), (kv_start // d, kv_stop // d),
                       algebra.interval(Part.MLP, degree, rank),
                       algebra.interval(Part.HEAD, degree, rank))


def check_config(spec: ModelSpec, parallel: ParallelConfig) -> None:
    """Raise `ReplicaConfigError` unless one replica of `spec` can run as `parallel`."""
    if parallel.D != 1:
        raise ReplicaConfigError(f"a sharded replica runs one data-parallel replica, got D={parallel.D}")
    if parallel.P > spec.num_layers:
        raise ReplicaConfigError(
            f"{parallel.P} pipeline stages exceed the model's {spec.num_layers} layers")


def shard_layout(spec: ModelSpec, stages: int, degree: int, stage: int, rank: int) -> ShardLayout:
    """The holding of (stage, rank) in a `stages` x `degree` replica."""
    if not 0 <= rank < degree:
        raise ReplicaConfigError(f"tensor rank {rank} outside 0..{degree - 1}")
    try:
        layers = stage_layer_range(spec.num_layers, stages, stage, spec.stage_cost_edges)
    except PlanningError as exc:
        raise ReplicaConfigError(str(exc)) from None
    return ShardLayout(stages, degree, stage, rank, layers, tensor_shard(spec, degree, rank))


def replica_layouts(spec: ModelSpec, parallel: ParallelConfig) -> tuple[ShardLayout, ...]:
    """Every position's holding in canonical order (stage-major, then rank)."""
    check_config(spec, parallel)
    return tuple(shard_layout(spec, parallel.P, parallel.M, s, r)
                 for s in range(parallel.P) for r in range(parallel.M))
