"""Plain frozen messages between the driver and the shard runtimes (picklable, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica.layout import ShardLayout
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.migration import Transfer
from elastic_llm.planning.slices import Slice


@dataclass(frozen=True)
class ModelSource:
    """Where a shard runtime reads its model from."""

    checkpoint_dir: str  #: directory of config.json and safetensors
    spec: ModelSpec  #: the model's shapes (bytes_per_param matches `dtype`)
    config: dict[str, Any]  #: config.json (RoPE settings)
    dtype: str = "float32"  #: torch dtype name of weights and KV
    device: str = "cpu"  #: "cpu" or "cuda" (a CUDA worker takes GPU `index % device_count`)


@dataclass(frozen=True)
class PeerShard:
    """A shard of ANOTHER live replica that a new replica may read weight slices from.

    It serves its own replica meanwhile (its own process group), so it cannot join the new
    replica's group: what it sends is pulled by the receiving shard over the transport's own
    channel (`runtime.PeerReader`), one transfer at a time in plan order. Weights only, no KV.
    """

    name: str  #: its name in transfer lists (must differ from every member of the new replica)
    parallel: tuple[int, int]  #: its replica's (P, M)
    stage: int  #: its pipeline stage
    rank: int  #: its tensor-parallel rank
    address: str = ""  #: where it lives (Dask: the worker address; "" when not reachable)
    handle: str = ""  #: how to reach it there (Dask: the `ShardActor`'s key)


@dataclass(frozen=True)
class GroupSpec:
    """One configuration epoch's `torch.distributed` process group, as seen by one member."""

    host: str  #: TCPStore host (the driver's)
    port: int  #: TCPStore port
    epoch: int  #: configuration epoch: the store prefix, so every epoch rendezvouses afresh
    rank: int  #: this process's rank in the group
    world_size: int  #: members
    backend: str  #: "gloo" (CPU) or "nccl" (CUDA)
    tensor_groups: tuple[tuple[int, ...], ...] = ()  #: ranks of each tensor-parallel group (M > 1)
    timeout_s: float = 120.0  #: every collective and receive gives up after this


@dataclass(frozen=True)
class MicroBatch:
    """Works that walk the pipeline together."""

    works: tuple[StepWork, ...]  #: in the step's order

    @property
    def num_tokens(self) -> int:
        """Rows of the flat batch."""
        return sum(len(w.token_ids) for w in self.works)


@dataclass(frozen=True)
class StepPlan:
    """One forward pass of the replica, split into micro-batches kept in flight together."""

    micro_batches: tuple[MicroBatch, ...]  #: contiguous, in the step's order


@dataclass(frozen=True)
class MigrationOrders:
    """What one process does in a reconfiguration: its part of the global transfer list, then
    rebuild itself as `layout` (None: it leaves the replica and only sends)."""

    layout: ShardLayout | None  #: the new holding
    transfers: tuple[Transfer, ...]  #: every transfer, in the one global order all members follow
    ranks: tuple[tuple[str, int], ...]  #: worker name -> rank in the migration group
    kv_lengths: tuple[tuple[str, int], ...]  #: requests whose KV is kept, sorted by id
    #: (after, slice): this process frees `slice` once transfer `after` is done (-1: at the
    #: start); the planner's releases, so that it stays within its memory bound throughout
    releases: tuple[tuple[int, Slice], ...] = ()
    #: become `layout` right after transfer `build_after` (-1: before the first; None: after the
    #: last): its stage is ready then and later transfers no longer concern its new holding
    build_after: int | None = None
    #: shards of other replicas named as `Transfer.src` in `transfers`: pulled, not received
    peers: tuple[PeerShard, ...] = ()


@dataclass(frozen=True)
class MigrationStats:
    """What one process did in a reconfiguration."""

    worker: str  #: who reports
    bytes_sent: int  #: to peers
    bytes_received: int  #: from peers
    bytes_read: int  #: from the checkpoint
    transfer_seconds: tuple[tuple[int, float], ...]  #: (transfer index, seconds) it received
    seconds: float  #: transfers and rebuild
    #: most bytes of weights + KV it held at any sampled point (storages counted once; sampled
    #: before the migration, after every transfer it took part in or release it made, and after
    #: its rebuild; a copy inside one step, e.g. building one tensor, is not sampled)
    peak_bytes: int = 0
    start_bytes: int = 0  #: bytes held when the migration began (old network + KV caches)
    end_bytes: int = 0  #: bytes held when it ended (new network + KV caches)
    built_after: int | None = None  #: transfer index after which it became its new layout
    ready_time: float = 0.0  #: wall clock (`time.time()`) when it had
    bytes_from_peers: int = 0  #: weight bytes pulled from shards of other replicas
    #: transfer indices whose peer could not serve them: read from the checkpoint instead
    peer_fallbacks: tuple[int, ...] = ()
