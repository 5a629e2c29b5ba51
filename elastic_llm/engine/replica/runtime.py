"""`ShardRuntime`: one position (stage, rank) of a sharded replica, living in one worker process.

It owns the position's `LlamaNetwork` slice, every request's KV block (its layers x its KV heads)
and its membership in the current epoch's process group. It knows nothing about how it was
launched: the local `ShardedExecutor` drives it through a pipe (`process.worker_main`), and a Dask
actor can drive the same methods later. Every argument and result is a plain value or tensor.

A step: for each micro-batch, take the token ids (first stage) or receive the hidden states from
the previous stage, run the held layers (the tensor-parallel all-reduce runs inside the network's
`reduce`), and send the result on without waiting, so the next micro-batch starts at once; the
last stage returns the logits of its vocabulary rows for the works that sample.

Weights from other replicas: a migration's transfer whose source is a `PeerShard` (a shard of
another live replica, busy in its own process group) is pulled through the `PeerReader` the
runtime was given (the transport's own channel: Dask actor calls), and the peer serves it with
`read_weights`. A pull that fails reads those pieces from the checkpoint instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from elastic_llm.engine.replica.comm import Collectives, PendingSend
from elastic_llm.engine.replica.holding import Holding, storage_bytes
from elastic_llm.engine.replica.kv import merge_kv, slice_kv
from elastic_llm.engine.replica.layout import ShardLayout
from elastic_llm.engine.replica.messages import (
    GroupSpec,
    MicroBatch,
    MigrationOrders,
    MigrationStats,
    ModelSource,
    PeerShard,
    StepPlan,
)
from elastic_llm.engine.replica.pieces import TensorPiece, WeightPieces, piece_shape, slice_pieces
from elastic_llm.model.kv_cache import KVCache, KVState
from elastic_llm.model.layers import SequenceSlice, no_reduce
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.loader import build_rotary
from elastic_llm.model.weights import SafetensorsWeights
from elastic_llm.planning.migration import Transfer
from elastic_llm.planning.slices import Slice

logger = logging.getLogger(__name__)

#: Spare KV positions a new cache gets beyond its first tokens (as `LocalExecutor` allocates).
_CACHE_SPARE = 16


class PeerReader(Protocol):
    """Pulls weight pieces from a shard of another replica (the peer's `read_weights`)."""

    def __call__(self, peer: PeerShard, pieces: Sequence[TensorPiece]) -> list[torch.Tensor]:
        """The tensors of `pieces`, in order (raises when the peer cannot serve them)."""
        ...


class ShardRuntime:
    """The network slice, KV blocks and process-group membership of one replica position."""

    def __init__(self, name: str, source: ModelSource, device_index: int = 0,
                 peer_reader: PeerReader | None = None) -> None:
        """`name`: the worker's id in transfer lists; `device_index`: its GPU on CUDA;
        `peer_reader`: how to pull weights from other replicas' shards (None: it cannot, and
        such transfers read the checkpoint)."""
        self.name = name
        self.peer_reader = peer_reader
        self.source = source
        self.spec = source.spec
        self.dtype: torch.dtype = getattr(torch, source.dtype)
        if source.device == "cuda":
            self.device = torch.device("cuda", device_index % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(source.device)
        self.comm = Collectives()
        self.layout: ShardLayout | None = None
        self.network: LlamaNetwork | None = None
        self._caches: dict[str, KVCache] = {}
        self._checkpoint: SafetensorsWeights | None = None

    # ------------------------------------------------------------------ membership
    def join(self, group: GroupSpec) -> None:
        """Leave the current epoch's group and join `group` (a rendezvous: all members call it)."""
        self.comm.join(group)

    def leave(self) -> None:
        """Leave the current epoch's group."""
        self.comm.leave()

    def close(self) -> None:
        """Leave the group and drop weights and KV."""
        self.comm.leave()
        self.network, self.layout, self._caches = None, None, {}

    # ------------------------------------------------------------------ the forward pass
    def step(self, plan: StepPlan) -> torch.Tensor | None:
        """Run this position's part of one replica step; the last stage returns logits
        ``[n_sampled, held vocabulary rows]`` for the sampling works in order, others None."""
        layout, network = self._held()
        hidden = self.spec.hidden_size
        sends: list[PendingSend] = []
        logits: list[torch.Tensor] = []
        try:
            for micro in plan.micro_batches:
                seqs, ids, positions, rows = self._prepare(micro, layout)
                if layout.has_embedding:
                    inputs = ids
                else:
                    inputs = self.comm.recv((micro.num_tokens, hidden), self.dtype, self.device,
                                            layout.stage_peer(layout.stage - 1))
                out = network(inputs, positions, seqs, rows if layout.has_head else None)
                for seq in seqs:
                    seq.cache.advance(seq.num_new)
                if layout.has_head:
                    logits.append(out)
                else:
                    sends.append(self.comm.send(out, layout.stage_peer(layout.stage + 1)))
        finally:
            for pending in sends:
                pending.wait()
        return torch.cat(logits) if layout.has_head else None

    def _prepare(self, micro: MicroBatch, layout: ShardLayout
                 ) -> tuple[list[SequenceSlice], torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs: list[SequenceSlice] = []
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for work in micro.works:
            n = len(work.token_ids)
            cache = self._caches.get(work.request_id)
            if cache is None:
                cache = KVCache(layout.layers.start, len(layout.layers), layout.shard.num_kv_heads,
                                self.spec.head_dim, self.dtype, self.device, capacity=n + _CACHE_SPARE)
                self._caches[work.request_id] = cache
            if cache.length != work.start_position:
                raise RuntimeError(f"{self.name}: request {work.request_id!r} holds {cache.length} "
                                   f"positions, work starts at {work.start_position}")
            cache.reserve(n)
            seqs.append(SequenceSlice(len(ids), n, cache))
            ids.extend(work.token_ids)
            positions.extend(range(work.start_position, work.start_position + n))
            if work.sample:
                rows.append(len(ids) - 1)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return seqs, as_tensor(ids), as_tensor(positions), as_tensor(rows)

    # ------------------------------------------------------------------ KV by request
    def kv_lengths(self) -> dict[str, int]:
        """Positions cached per request held."""
        return {rid: cache.length for rid, cache in self._caches.items()}

    def export_kv(self, request_id: str) -> KVState | None:
        """A copy of the request's KV block (this position's layers x KV heads), or None."""
        cache = self._caches.get(request_id)
        if cache is None or self.layout is None:
            return None
        return replace(cache.export(), head_start=self.layout.shard.kv_heads[0])

    def import_kv(self, request_id: str, state: KVState) -> None:
        """Adopt this position's block of `state` (which must cover it) as the request's KV."""
        layout, _ = self._held()
        block = slice_kv(state, layout.layers, layout.shard.kv_heads)
        self._caches[request_id] = KVCache.from_state(block.to(self.device), self.device)

    def release(self, request_ids: Sequence[str]) -> None:
        """Forget these requests' KV (unknown ids are ignored)."""
        for request_id in request_ids:
            self._caches.pop(request_id, None)

    def read_weights(self, pieces: Sequence[TensorPiece]) -> list[torch.Tensor]:
        """(Serving as a peer) copies of these weight pieces of this position's network, in order;
        raises `ModelLoadError` for a piece it does not hold (e.g. it was resharded meanwhile)."""
        _, network = self._held()
        store = WeightPieces.from_network(network)
        return [store.get(p.name, p.dim, p.start, p.stop).clone() for p in pieces]

    # ------------------------------------------------------------------ reconfiguration
    def migrate(self, orders: MigrationOrders) -> MigrationStats:
        """Carry out this process's part of a reconfiguration, then become `orders.layout`.

        Every member walks the same global transfer list in order: it sends what it is the source
        of, receives what it is the target of (or reads it from the checkpoint), and skips the
        rest; one order for all makes the blocking point-to-point transfers deadlock-free. Only
        pieces this process lacks arrive; the rest of its new holding is its own old tensors.

        Progressive and memory-bounded: the old network is dissolved into pieces that own their
        storage, each of `orders.releases` frees its slice right after its transfer, and the new
        network is built right after transfer `orders.build_after` (its stage is ready then),
        keeping only the not yet released old pieces besides it. The bytes held are measured after
        every step this process takes part in (`MigrationStats.peak_bytes`).
        """
        started = time.perf_counter()
        ranks = dict(orders.ranks)
        lengths = dict(orders.kv_lengths)
        start_bytes = self._held_bytes()
        held = Holding(self.spec, WeightPieces(self.spec), self._own_kv_blocks(lengths), start_bytes)
        self._caches = {}
        held.store = self._dissolve()
        frees: dict[int, list[Slice]] = {}
        for after, piece in orders.releases:
            frees.setdefault(after, []).append(piece)
        last = len(orders.transfers) - 1
        build_after = last if orders.build_after is None else orders.build_after
        held.free(frees.pop(-1, ()))
        built, ready_time = None, 0.0
        if build_after < 0:
            built, ready_time = -1, self._build(orders.layout, held, lengths)
        self._measure(held)
        sent, taken = 0, {"received": 0, "read": 0, "pulled": 0}
        fallbacks: list[int] = []
        timings: list[tuple[int, float]] = []
        peers = {peer.name: peer for peer in orders.peers}
        for index, transfer in enumerate(orders.transfers):
            involved = self.name in (transfer.src, transfer.dst) or index in frees
            if transfer.src == self.name:
                buffer = self._pack(transfer, held.store, held.kv, lengths)
                self.comm.send(buffer, ranks[transfer.dst]).wait()
                sent += buffer.numel() * buffer.element_size()
            elif transfer.dst == self.name:
                began = time.perf_counter()
                how, nbytes = self._take(transfer, ranks, peers, held, lengths)
                taken["read" if how == "fallback" else how] += nbytes
                if how == "fallback":
                    fallbacks.append(index)
                timings.append((index, time.perf_counter() - began))
            held.free(frees.get(index, ()))
            if index == build_after:
                built, ready_time, involved = index, self._build(orders.layout, held, lengths), True
            if involved:
                self._measure(held)
        if built is None:
            built, ready_time = last, self._build(orders.layout, held, lengths)
        held.store, held.kv = WeightPieces(self.spec), {}  # every old piece left is stale now
        end_bytes = self._measure(held)
        return MigrationStats(self.name, sent, taken["received"], taken["read"], tuple(timings),
                              time.perf_counter() - started, held.peak, start_bytes, end_bytes,
                              built, ready_time, taken["pulled"], tuple(fallbacks))

    def _take(self, transfer: Transfer, ranks: dict[str, int], peers: dict[str, PeerShard],
              held: Holding, lengths: dict[str, int]) -> tuple[str, int]:
        """Get `transfer` (this process is its target): from a member of the group ("received"),
        a peer replica ("pulled"), the checkpoint ("read"), or the checkpoint after the peer
        failed ("fallback"); with the bytes."""
        if transfer.src in peers:
            pulled = self._pull(peers[transfer.src], transfer, held.store)
            if pulled:
                return "pulled", pulled
        elif transfer.src is not None:
            return "received", self._receive(transfer, ranks[transfer.src], held.store, held.kv, lengths)
        pieces = slice_pieces(self.spec, transfer.slice)
        read = held.store.read_checkpoint(self._weights(), pieces, self.dtype, self.device)
        return ("read" if transfer.src is None else "fallback"), read

    def _pull(self, peer: PeerShard, transfer: Transfer, store: WeightPieces) -> int:
        """Pull weight `transfer` from `peer` into `store`; the bytes (0: it failed, nothing
        was added, the caller reads the checkpoint)."""
        pieces = slice_pieces(self.spec, transfer.slice)
        try:
            if self.peer_reader is None:
                raise RuntimeError("this runtime has no way to reach other replicas")
            tensors = self.peer_reader(peer, pieces)
            shapes = [piece_shape(store.shapes, p) for p in pieces]
            if [tuple(t.shape) for t in tensors] != shapes:
                raise RuntimeError(f"peer sent shapes {[tuple(t.shape) for t in tensors]}, not {shapes}")
        except Exception as exc:  # noqa: BLE001 - the checkpoint still has it
            logger.warning("%s: peer %s could not send %s (%s: %s): reading the checkpoint",
                           self.name, peer.name, transfer.slice, type(exc).__name__, exc)
            return 0
        nbytes = 0
        for piece, tensor in zip(pieces, tensors, strict=True):
            tensor = tensor.to(self.device, self.dtype)
            store.add(piece, tensor)
            nbytes += tensor.numel() * tensor.element_size()
        return nbytes

    def _dissolve(self) -> WeightPieces:
        """The old network as pieces that each own their storage (the network is dropped)."""
        if self.network is None:
            return WeightPieces(self.spec)
        store = WeightPieces.from_network(self.network)
        self.network, self.layout = None, None
        store.own()
        return store

    def _build(self, layout: ShardLayout | None, held: Holding, lengths: dict[str, int]) -> float:
        """Become `layout` from `held` (its stage is ready); afterwards `held` keeps only the old
        pieces the new network does not hold (views of the new network serve later sends).
        Returns the wall-clock time it was done."""
        self._rebuild(layout, held.store, held.kv, lengths)
        if self.network is not None:
            fresh = WeightPieces.from_network(self.network)
            for piece, _ in fresh.items():
                held.store.discard(piece)
            fresh.merge(held.store)
            held.store, held.kv = fresh, {}  # KV moves come first: none is left to send
        return time.time()

    def _measure(self, held: Holding) -> int:
        """Bytes `held` and the new network and caches hold now (raises `held.peak`)."""
        params = self.network.parameters() if self.network is not None else ()
        return held.measure(params, sum(c.allocated_bytes for c in self._caches.values()))

    def _held_bytes(self) -> int:
        """Bytes of the network's parameters and the KV caches' buffers (storages counted once)."""
        params = list(self.network.parameters()) if self.network is not None else []
        return storage_bytes(params) + sum(c.allocated_bytes for c in self._caches.values())

    def _own_kv_blocks(self, lengths: dict[str, int]) -> dict[str, list[KVState]]:
        """This process's old KV blocks of the requests that are kept (checked against `lengths`)."""
        blocks: dict[str, list[KVState]] = {rid: [] for rid in lengths}
        if self.layout is None:
            return blocks
        for rid, length in lengths.items():
            state = self.export_kv(rid)
            if state is None or state.length != length:
                raise RuntimeError(f"{self.name}: request {rid!r} should cache {length} positions, "
                                   f"holds {None if state is None else state.length}")
            blocks[rid].append(state)
        return blocks

    def _kv_heads(self, transfer: Transfer) -> tuple[int, int]:
        d = self.spec.head_dim
        if transfer.slice.start % d or transfer.slice.stop % d:
            raise RuntimeError(f"KV slice {transfer.slice} is not head-aligned")
        return transfer.slice.start // d, transfer.slice.stop // d

    def _pack(self, transfer: Transfer, store: WeightPieces, kv: dict[str, list[KVState]],
              lengths: dict[str, int]) -> torch.Tensor:
        """One flat buffer holding everything `transfer` moves."""
        layer = transfer.slice.layer
        if transfer.slice.is_kv:
            heads = self._kv_heads(transfer)
            parts = []
            for rid in lengths:
                block = merge_kv(kv[rid], range(layer, layer + 1), heads, self.spec.head_dim)
                parts += [block.keys[0], block.values[0]]
        else:
            parts = [store.get(p.name, p.dim, p.start, p.stop)
                     for p in slice_pieces(self.spec, transfer.slice)]
        return torch.cat([t.reshape(-1) for t in parts]).to(self.device, self.dtype)

    def _receive(self, transfer: Transfer, src: int, store: WeightPieces,
                 kv: dict[str, list[KVState]], lengths: dict[str, int]) -> int:
        """Receive `transfer` from group rank `src` into `store` / `kv`; returns the bytes."""
        layer = transfer.slice.layer
        if transfer.slice.is_kv:
            heads = self._kv_heads(transfer)
            shapes = [(heads[1] - heads[0], length, self.spec.head_dim)
                      for length in lengths.values() for _ in "kv"]
        else:
            pieces = slice_pieces(self.spec, transfer.slice)
            shapes = [piece_shape(store.shapes, p) for p in pieces]
        numel = sum(math.prod(s) for s in shapes)
        buffer = self.comm.recv((numel,), self.dtype, self.device, src)
        tensors = [t.view(s) for t, s in zip(buffer.split([math.prod(s) for s in shapes]), shapes,
                                               strict=True)]
        if transfer.slice.is_kv:
            for i, (rid, length) in enumerate(lengths.items()):
                kv[rid].append(KVState(layer, (tensors[2 * i],), (tensors[2 * i + 1],), length, heads[0]))
        else:
            for piece, tensor in zip(pieces, tensors, strict=True):
                store.add(piece, tensor)
        return buffer.numel() * buffer.element_size()

    def _rebuild(self, layout: ShardLayout | None, store: WeightPieces,
                 kv: dict[str, list[KVState]], lengths: dict[str, int]) -> None:
        """Become `layout`: a new network from `store`, KV blocks cut from `kv`."""
        self.network, self.layout, self._caches = None, None, {}
        if layout is None:
            return
        reduce = self.comm.all_reduce if layout.degree > 1 else no_reduce
        rotary = build_rotary(self.source.config, self.spec)  # type: ignore[arg-type]
        network = LlamaNetwork(self.spec, rotary, layers=layout.layers, shard=layout.shard,
                               reduce=reduce, has_embedding=layout.has_embedding,
                               has_head=layout.has_head)
        network.load(store, self.dtype)  # type: ignore[arg-type]
        network.to(self.device)
        network.rotary.inv_freq = network.rotary.inv_freq.to(self.device)
        self.network, self.layout = network.eval(), layout
        for rid in lengths:
            block = merge_kv(kv[rid], layout.layers, layout.shard.kv_heads, self.spec.head_dim, lengths[rid])
            self._caches[rid] = KVCache.from_state(block, self.device)

    # ------------------------------------------------------------------ introspection
    def describe(self) -> dict[str, object]:
        """Name, layout and bytes held (weights counted once per storage, valid KV)."""
        weights = 0
        if self.network is not None:
            seen: set[int] = set()
            for param in self.network.parameters():
                key = param.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    weights += param.untyped_storage().nbytes()
        return {"name": self.name, "layout": self.layout, "weight_bytes": weights,
                "kv_bytes": sum(c.nbytes for c in self._caches.values())}

    def _held(self) -> tuple[ShardLayout, LlamaNetwork]:
        if self.layout is None or self.network is None:
            raise RuntimeError(f"{self.name} holds no position")
        return self.layout, self.network

    def _weights(self) -> SafetensorsWeights:
        if self._checkpoint is None:
            self._checkpoint = SafetensorsWeights(Path(self.source.checkpoint_dir))
        return self._checkpoint
