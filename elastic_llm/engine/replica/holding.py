"""What one shard process holds while it migrates, and how many bytes that really is.

During a migration a process holds its weights as `WeightPieces` (its old network dissolved into
pieces that each own their storage, plus what it received) and its requests' KV as `KVState`
pieces per request; after its rebuild, the new network and KV caches. `Holding` keeps both, frees
what the planner's releases name (weights through `WeightPieces.discard`, KV through `discard_kv`)
and measures the bytes held as the sum of the distinct storages behind every tensor it keeps, so
a view is never counted twice and a freed piece is really gone. `peak` is the most it measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from elastic_llm.engine.replica.kv import kv_heads, kv_layers, slice_kv
from elastic_llm.engine.replica.pieces import WeightPieces, slice_pieces
from elastic_llm.model.kv_cache import KVState
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.slices import Slice


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (each counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def discard_kv(pieces: list[KVState], layer: int, heads: tuple[int, int]) -> list[KVState]:
    """`pieces` without layer `layer` x KV heads `heads`; what stays of a cut layer is copied."""
    out: list[KVState] = []
    for piece in pieces:
        held, (h0, h1) = kv_layers(piece), kv_heads(piece)
        if layer not in held or heads[1] <= h0 or heads[0] >= h1:
            out.append(piece)
            continue
        out.extend(slice_kv(piece, range(other, other + 1), (h0, h1)) for other in held if other != layer)
        for lo, hi in ((h0, min(h1, heads[0])), (max(h0, heads[1]), h1)):
            if hi > lo:
                part = slice_kv(piece, range(layer, layer + 1), (lo, hi))
                out.append(KVState(layer, (part.keys[0].clone(),), (part.values[0].clone(),),
                                   part.length, lo))
    return out


@dataclass
class Holding:
    """The weights and KV a process holds during one migration (mutable, process-local)."""

    spec: ModelSpec  #: the model (to cut slices into tensor pieces)
    store: WeightPieces  #: weight pieces: dissolved old network, received pieces, stale remainders
    kv: dict[str, list[KVState]]  #: request id -> KV pieces (own old blocks and received ones)
    peak: int = 0  #: most bytes measured so far

    def free(self, slices: Iterable[Slice]) -> None:
        """Stop holding these slices (the planner's releases for this process)."""
        for piece in slices:
            if piece.is_kv:
                d = self.spec.head_dim
                heads = (piece.start // d, piece.stop // d)
                self.kv = {rid: discard_kv(blocks, piece.layer, heads) for rid, blocks in self.kv.items()}
            else:
                for part in slice_pieces(self.spec, piece):
                    self.store.discard(part)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held."""
        yield from self.store.tensors()
        for blocks in self.kv.values():
            for block in blocks:
                yield from block.keys
                yield from block.values

    def measure(self, others: Iterable[torch.Tensor] = (), other_bytes: int = 0) -> int:
        """Bytes held now: the distinct storages of these pieces and of `others` (the network's
        parameters), plus `other_bytes` (KV caches' buffers); raises `peak` when more."""
        now = storage_bytes([*self.tensors(), *others]) + other_bytes
        self.peak = max(self.peak, now)
        return now
