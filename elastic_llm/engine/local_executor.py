"""`LocalExecutor`: the whole model in this process, with KV caches that can live on the host.

Swapping: `swap_out` copies a request's valid KV into host memory (pinned on CUDA) and frees the
device copy; `prefetch` starts the copy back on a background thread (on CUDA on its own stream),
so it overlaps the next forward pass; `swap_in` waits for a prefetch in flight or copies at once.
On a CPU-only machine "device" and "host" are the same RAM: the copies are real and timed, and the
device budget the engine enforces is a logical one.

KV layout: requests' caches live in slots of one `KVPool`, so the decode attention of a whole batch
is a few batched ops per layer; a request that would outgrow the pool's `pool_max_positions` moves
to a private `KVCache` (attended on its own). On CPU the network's matrices are also packed once
for our AVX2 multiply (`LlamaNetwork.pack_weights`, `cpu_ops.linear`), on transparent huge pages
where Linux allows (`elastic_llm.model.huge_pages`), as is the pool.

Prefix caching: the KV of finished prompt prefills is kept in whole blocks (`PrefixCache`, up to
`prefix_cache_bytes`, outside the KV budget of swapping); a new request whose prompt starts with
cached blocks gets a copy of them and computes only the rest (`reuse_prefix`, `remember_prefix`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.prefix_cache import PrefixCache
from elastic_llm.model.kv_cache import KVCache, KVPool, KVState, PooledKVCache
from elastic_llm.model.layers import SequenceSlice
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.spec import ModelSpec


class LocalExecutor:
    """Runs a `LlamaNetwork` holding every layer and keeps per-request KV caches by id."""

    DEFAULT_PREFIX_CACHE_BYTES = 64 * 2**20  #: prefix KV kept by default (64 MiB)

    def __init__(self, network: LlamaNetwork, spec: ModelSpec, *, pool_max_positions: int = 1024,
                 pack_weights: bool = True, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        self.network = network
        self.spec = spec
        first = next(network.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._kv_heads = network.shard.num_kv_heads
        self._pool = (KVPool(0, spec.num_layers, self._kv_heads, spec.head_dim, self.dtype, self.device,
                             max_capacity=pool_max_positions)
                      if self._kv_heads > 0 and pool_max_positions > 0 else None)
        if pack_weights and self.device.type == "cpu":
            network.pack_weights()
        self._caches: dict[str, KVCache | PooledKVCache] = {}
        self.prefixes = (PrefixCache(prefix_cache_bytes)
                         if prefix_cache_bytes > 0 and self._kv_heads > 0 else None)  #: None: off
        self._host: dict[str, KVState] = {}
        self._incoming: dict[str, Future[KVCache]] = {}
        self._copier: ThreadPoolExecutor | None = None
        self.swap_seconds = 0.0  #: time the engine thread spent blocked on swap copies
        self.bytes_swapped_out = 0  #: KV bytes moved device -> host so far
        self.bytes_swapped_in = 0  #: KV bytes moved host -> device so far

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token of one request (all layers, keys and values)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.spec.num_layers * self._kv_heads * self.spec.head_dim * element

    # ------------------------------------------------------------------ forward
    def execute(self, works: Sequence[StepWork]) -> torch.Tensor:
        """One forward pass over the packed new tokens of `works`."""
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SequenceSlice] = []
        logit_rows: list[int] = []
        for work in works:
            cache = self._device_cache(work.request_id, len(work.token_ids))
            if cache.length != work.start_position:
                raise RuntimeError(f"request {work.request_id!r}: KV holds {cache.length} "
                                   f"positions, work starts at {work.start_position}")
            if isinstance(cache, PooledKVCache) and not cache.pool.fits(cache.length + len(work.token_ids)):
                cache = self._spill(work.request_id, cache)
            start = len(tokens)
            tokens.extend(work.token_ids)
            positions.extend(range(work.start_position, work.start_position + len(work.token_ids)))
            cache.reserve(len(work.token_ids))
            seqs.append(SequenceSlice(start, len(work.token_ids), cache))
            if work.sample:
                logit_rows.append(len(tokens) - 1)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        logits = self.network(as_tensor(tokens), as_tensor(positions), seqs, as_tensor(logit_rows))
        for seq in seqs:
            seq.cache.advance(seq.num_new)
        return logits

    def _device_cache(self, request_id: str, upcoming: int) -> KVCache | PooledKVCache:
        if request_id in self._host or request_id in self._incoming:
            self.swap_in([request_id])
        cache = self._caches.get(request_id)
        if cache is None:
            if self._pool is not None and self._pool.fits(upcoming):
                cache = self._pool.allocate(upcoming)
            else:
                cache = KVCache(0, self.spec.num_layers, self._kv_heads, self.spec.head_dim,
                                self.dtype, self.device, capacity=upcoming + 16)
            self._caches[request_id] = cache
        return cache

    def _adopt(self, state: KVState | KVCache) -> KVCache | PooledKVCache:
        """Move a device-side state or private cache into the pool when it fits there."""
        if self._pool is not None and self._pool.fits(state.length + 16):
            return self._pool.adopt(state)
        if isinstance(state, KVCache):
            return state
        return KVCache.from_state(state, self.device)

    def _spill(self, request_id: str, cache: PooledKVCache) -> KVCache:
        """Move a request that outgrows the pool to a private cache."""
        private = KVCache.from_state(cache.export(), self.device)
        cache.release()
        self._caches[request_id] = private
        return private

    def _drop(self, request_id: str) -> KVCache | PooledKVCache | None:
        cache = self._caches.pop(request_id, None)
        if isinstance(cache, PooledKVCache):
            cache.release()
        return cache

    # ------------------------------------------------------------------ prefix caching
    def reuse_prefix(self, request_id: str, tokens: Sequence[int], limit: int) -> int:
        """Give a request that holds no KV the cached KV of the longest whole-block prefix of
        ``tokens[:limit]``; returns the positions filled (0: nothing cached, or caching off)."""
        if (self.prefixes is None or request_id in self._caches or request_id in self._host
                or request_id in self._incoming):
            return 0
        found = self.prefixes.match(tokens, limit)
        if found is None:
            return 0
        keys, values = found
        state = KVState(0, tuple(keys.unbind(0)), tuple(values.unbind(0)), keys.shape[2])
        self._caches[request_id] = self._adopt(state)
        return state.length

    def remember_prefix(self, request_id: str, tokens: Sequence[int]) -> None:
        """Keep the whole blocks of `tokens` (the request's first tokens, already computed)."""
        cache = self._caches.get(request_id)
        if self.prefixes is not None and cache is not None:
            self.prefixes.insert(tokens[: cache.length], cache.read)

    # ------------------------------------------------------------------ KV by request
    def kv_length(self, request_id: str) -> int:
        """Positions cached for `request_id`, wherever they are (0 if none)."""
        if request_id in self._caches:
            return self._caches[request_id].length
        if request_id in self._host:
            return self._host[request_id].length
        if request_id in self._incoming:
            return self._incoming[request_id].result().length
        return 0

    def release(self, request_id: str) -> None:
        """Forget a request's KV everywhere."""
        incoming = self._incoming.pop(request_id, None)
        if incoming is not None:
            incoming.result()
        self._drop(request_id)
        self._host.pop(request_id, None)

    def export_kv(self, request_id: str) -> KVState | None:
        """A CPU copy of the request's KV, or None if it has none."""
        if request_id in self._incoming:
            self.swap_in([request_id])
        if request_id in self._host:
            return self._host[request_id].to("cpu")
        cache = self._caches.get(request_id)
        if cache is None or cache.length == 0:
            return None
        return cache.export().to("cpu")

    def import_kv(self, request_id: str, state: KVState) -> None:
        """Adopt `state` as the request's KV cache (on device)."""
        self.release(request_id)
        self._caches[request_id] = self._adopt(state.to(self.device))

    # ------------------------------------------------------------------ swapping
    def on_host(self) -> frozenset[str]:
        """Requests whose KV sits in host memory (prefetches in flight count as on device)."""
        return frozenset(self._host)

    def swap_out(self, request_ids: Sequence[str]) -> None:
        """Copy each request's valid KV to host memory and free the device buffers."""
        started = time.perf_counter()
        for request_id in request_ids:
            if request_id in self._incoming:
                self.swap_in([request_id])
            cache = self._caches.get(request_id)
            if cache is None or cache.length == 0:
                self._drop(request_id)
                continue
            state = cache.export()
            self._drop(request_id)
            self._host[request_id] = self._to_host(state)
            self.bytes_swapped_out += state.nbytes
        self.swap_seconds += time.perf_counter() - started

    def prefetch(self, request_ids: Sequence[str]) -> None:
        """Start copying these requests' KV back to the device on the background thread."""
        for request_id in request_ids:
            state = self._host.pop(request_id, None)
            if state is None:
                continue
            if self._copier is None:
                self._copier = ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch")
            self.bytes_swapped_in += state.nbytes
            self._incoming[request_id] = self._copier.submit(self._to_device, state)

    def swap_in(self, request_ids: Sequence[str]) -> None:
        """Make these requests' KV usable on the device now."""
        started = time.perf_counter()
        for request_id in request_ids:
            incoming = self._incoming.pop(request_id, None)
            if incoming is not None:
                self._caches[request_id] = self._adopt(incoming.result())
                continue
            state = self._host.pop(request_id, None)
            if state is not None:
                self.bytes_swapped_in += state.nbytes
                on_device = self._to_device(state) if self.device.type == "cuda" else state
                self._caches[request_id] = self._adopt(on_device)
        self.swap_seconds += time.perf_counter() - started

    def device_kv_bytes(self) -> int:
        """Valid KV bytes held in device memory now (prefetches in flight included)."""
        per_token = self.kv_bytes_per_token
        resident = sum(cache.length for cache in self._caches.values())
        resident += sum(future.result().length for future in self._incoming.values())
        return resident * per_token

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None

    def _to_host(self, state: KVState) -> KVState:
        if self.device.type != "cuda":
            return state  # `export` already copied the valid part into fresh host buffers
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (*state.keys, *state.values)]
        for dst, src in zip(pinned, (*state.keys, *state.values), strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        half = len(state.keys)
        return KVState(state.layer_start, tuple(pinned[:half]), tuple(pinned[half:]), state.length)

    def _to_device(self, state: KVState) -> KVCache:
        if self.device.type != "cuda":
            return KVCache.from_state(state, self.device)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            cache = KVCache.from_state(state, self.device)
        stream.synchronize()
        return cache
