"""Sharded replica: one model replica as P pipeline stages x M tensor ranks in P*M processes.

* ``layout``    - which layers and which AutoTP tensor shard each (stage, rank) holds
* ``pieces``    - weights by slice: planning-core slices as pieces of checkpoint tensors
* ``kv``        - KV by slice: cut and assemble a request's KV by layer range x KV-head range
* ``comm``      - one configuration epoch's `torch.distributed` group (gloo / NCCL)
* ``runtime``   - `ShardRuntime`: one position's network, KV and group, launch-agnostic; pulls
  weights from other replicas' shards (`PeerShard`) through a `PeerReader`
* ``reconfig``  - mapping and migration planning of a reconfiguration (planning core)
* ``holding``   - what a shard holds while it migrates: frees by slice, measured bytes
* ``report``    - `ReconfigurationReport`: transfers, per-stage readiness, peak bytes per shard
* ``transport`` - the driver-to-shards contract (`ShardTransport`, `Call`, `Reply`, `serve_call`)
* ``process``   - local worker processes and their pipes (`LocalProcessTransport`)
* ``sharded_executor`` - `ShardedDriver` (the driver over any transport) and `ShardedExecutor`, the
  engine's executor over P*M local processes (`elastic_llm.cluster.dask_sharded` has the Dask one)

Importing the package loads only the errors; the public classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elastic_llm.engine.replica.errors import (
    ReplicaConfigError,
    ReplicaError,
    ReplicaTimeoutError,
    ReplicaWorkerError,
)

if TYPE_CHECKING:
    from elastic_llm.engine.replica.messages import PeerShard
    from elastic_llm.engine.replica.runtime import PeerReader, ShardRuntime
    from elastic_llm.engine.replica.sharded_executor import (
        ReconfigurationReport,
        ShardedDriver,
        ShardedExecutor,
        StageReady,
        TransferRecord,
    )

__all__ = ["PeerReader", "PeerShard", "ReconfigurationReport", "ReplicaConfigError", "ReplicaError", "ReplicaTimeoutError",
           "ReplicaWorkerError", "ShardRuntime", "ShardedDriver", "ShardedExecutor", "StageReady",
           "TransferRecord"]

_LAZY = {"PeerShard": "messages", "PeerReader": "runtime", "ShardRuntime": "runtime", "ShardedExecutor": "sharded_executor",
         "ShardedDriver": "sharded_executor", "ReconfigurationReport": "sharded_executor",
         "TransferRecord": "sharded_executor", "StageReady": "sharded_executor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"elastic_llm.engine.replica.{_LAZY[name]}"), name)
    raise AttributeError(name)
