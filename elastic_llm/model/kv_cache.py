"""Per-request KV caches and their plain-tensor export (`KVState`).

Two layouts with one interface (`reserve`, `write_and_read`, `advance`, `read`, `export`, `length`):

- `KVCache`: a request's own buffers, for each layer of the process's layer range keys and values
  shaped ``[kv_heads, capacity, head_dim]``; the first ``length`` positions are valid. Capacity
  grows by doubling so appends are amortised O(1) and reads are views (no copy).
- `PooledKVCache`: a slot of a `KVPool` that holds many requests in one
  ``[layers, 2, slots, kv_heads, capacity, head_dim]`` tensor (keys, then values), so that the
  decode step of a whole batch writes its keys/values and attends with a few batched ops per layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

#: Share of a CPU pool's slots in use at which the storage of the next slot doubling is
#: zero-filled ahead, on a background thread (`KVPool`). Half: a burst of arrivals fills the rest
#: faster than the fill takes (316 ms measured live at 16 -> 32 slots when started at 3/4).
GROW_AHEAD_SLOTS_AT = 0.5
#: Share of a CPU pool's positions a reservation may reach before the next capacity doubling is
#: zero-filled ahead (requests grow one position per iteration, so this leaves many iterations).
GROW_AHEAD_POSITIONS_AT = 0.75


@dataclass(frozen=True)
class KVState:
    """A request's KV cache as plain tensors, detached from any engine.

    ``keys[i]`` / ``values[i]`` belong to layer ``layer_start + i`` and are shaped
    ``[num_kv_heads_held, length, head_dim]`` (contiguous, CPU or device); their first head is KV
    head ``head_start`` (a tensor-parallel rank holds a range of KV heads).
    """

    layer_start: int  #: first layer held
    keys: tuple[torch.Tensor, ...]  #: one tensor per layer held
    values: tuple[torch.Tensor, ...]  #: one tensor per layer held
    length: int  #: positions cached
    head_start: int = 0  #: first KV head held

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, device: torch.device | str) -> KVState:
        """A copy on `device`."""
        return KVState(self.layer_start, tuple(k.to(device) for k in self.keys),
                       tuple(v.to(device) for v in self.values), self.length, self.head_start)


class KVCache:
    """Growable KV cache of one request for layers ``[layer_start, layer_start + num_layers)``."""

    def __init__(self, layer_start: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 16) -> None:
        self.layer_start = layer_start
        self.length = 0  #: positions whose keys/values are valid in every layer
        shape = (num_kv_heads, max(1, capacity), head_dim)
        self._keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        """Positions that fit before the buffers grow."""
        return self._keys[0].shape[1] if self._keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the valid part of the cache."""
        if not self._keys:
            return 0
        per_layer = self._keys[0][:, : self.length].numel() * self._keys[0].element_size()
        return 2 * per_layer * len(self._keys)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the buffers, spare capacity included."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions (called before a forward pass writes them)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_capacity = max(need, 2 * self.capacity)
        for buffers in (self._keys, self._values):
            for i, old in enumerate(buffers):
                grown = old.new_empty((old.shape[0], new_capacity, old.shape[2]))
                grown[:, : self.length] = old[:, : self.length]
                buffers[i] = grown

    def write_and_read(self, layer: int, keys: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new `[kv_heads, n, head_dim]` keys/values after the valid part; return all so far.

        Does not advance `length`: the engine calls `advance(n)` once every layer has written.
        """
        idx = layer - self.layer_start
        n = keys.shape[1]
        end = self.length + n
        self._keys[idx][:, self.length:end] = keys
        self._values[idx][:, self.length:end] = values
        return self._keys[idx][:, :end], self._values[idx][:, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions valid."""
        self.length += n

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end), each ``[layers, kv_heads, n, head_dim]`` (a copy)."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"positions [{start}, {end}) are not all cached ({self.length} are)")
        return (torch.stack([k[:, start:end] for k in self._keys]),
                torch.stack([v[:, start:end] for v in self._values]))

    def export(self) -> KVState:
        """Copy the valid part out as a `KVState`."""
        return KVState(
            self.layer_start,
            tuple(k[:, : self.length].clone() for k in self._keys),
            tuple(v[:, : self.length].clone() for v in self._values),
            self.length,
        )

    @classmethod
    def from_state(cls, state: KVState, device: torch.device, spare: int = 16) -> KVCache:
        """Rebuild a cache from `state`, with room for `spare` more positions."""
        if not state.keys:
            raise ValueError("KVState holds no layers")
        first = state.keys[0]
        cache = cls(state.layer_start, len(state.keys), first.shape[0], first.shape[2],
                    first.dtype, device, capacity=state.length + spare)
        for i, (k, v) in enumerate(zip(state.keys, state.values, strict=True)):
            cache._keys[i][:, : state.length] = k
            cache._values[i][:, : state.length] = v
        cache.length = state.length
        return cache


class KVPool:
    """Preallocated KV storage shared by many requests, so decode attention can be batched.

    Keys and values of every held layer live in one tensor shaped
    ``[num_layers, 2, slots, kv_heads, capacity, head_dim]`` (index 0 keys, 1 values; `_keys` and
    `_values` are views of it), so one indexed write stores a batch's keys and values of a layer;
    each request owns one slot (a
    `PooledKVCache` handle). Slots and capacity grow by doubling (one copy of the pool, amortised);
    requests whose length would pass `max_capacity` do not fit and must use a private `KVCache`.
    Free slots are reused lowest first, so the live slots stay a compact range. The storage is
    zero-filled: positions past a request's length hold finite values, which masked batched
    attention needs. When the last slot is freed the storage is dropped.

    On a CPU, growing is a stall of every request in the batch, mostly spent zero-filling the new
    storage (first touch of its pages: 235 ms for 360 MiB on the 2-core development machine). So
    the next growth's storage is zero-filled ahead on a background thread, and the growth itself
    only copies the old contents in: twice the slots once `GROW_AHEAD_SLOTS_AT` of them are in
    use, twice the positions once a reservation reaches `GROW_AHEAD_POSITIONS_AT` of them (both
    when both hold). A spare at least as large as a growth needs is taken whole. Until then the
    pool holds that spare as well: two to four times its own size.
    """

    def __init__(self, layer_start: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, slots: int = 8, capacity: int = 128,
                 max_capacity: int = 2048) -> None:
        self.layer_start = layer_start
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_capacity = max_capacity
        self._initial = (max(1, slots), max(1, min(capacity, max_capacity)))
        self._set_storage(self._no_storage())
        self._owners: list[PooledKVCache | None] = []
        self._grow_ahead = self.device.type == "cpu"
        self._spare: _SpareStorage | None = None
        self.growths = 0  #: times the storage was reallocated larger
        self.growths_prepared = 0  #: of those, the ones whose storage was zero-filled ahead

    # ------------------------------------------------------------------ storage
    @property
    def slots(self) -> int:
        """Slots allocated (live or free)."""
        return len(self._owners)

    @property
    def capacity(self) -> int:
        """Positions each slot holds before the pool grows."""
        return self._keys.shape[3]

    @property
    def live(self) -> int:
        """Slots owned by a request."""
        return sum(owner is not None for owner in self._owners)

    def keys(self, layer: int) -> torch.Tensor:
        """Keys of absolute layer `layer`: ``[slots, kv_heads, capacity, head_dim]`` (a view)."""
        return self._keys[layer - self.layer_start]

    def values(self, layer: int) -> torch.Tensor:
        """Values of absolute layer `layer`: ``[slots, kv_heads, capacity, head_dim]`` (a view)."""
        return self._values[layer - self.layer_start]

    def kv(self, layer: int) -> torch.Tensor:
        """Keys and values of absolute layer `layer`: ``[2, slots, kv_heads, capacity, head_dim]``."""
        return self._kv[layer - self.layer_start]

    def _no_storage(self) -> torch.Tensor:
        return torch.empty((self.num_layers, 2, 0, self.num_kv_heads, 0, self.head_dim),
                           dtype=self.dtype, device=self.device)

    def _set_storage(self, kv: torch.Tensor) -> None:
        self._kv = kv
        self._keys, self._values = kv[:, 0], kv[:, 1]

    def _shape(self, slots: int, capacity: int) -> tuple[int, ...]:
        return (self.num_layers, 2, slots, self.num_kv_heads, capacity, self.head_dim)

    def _allocate_storage(self, slots: int, capacity: int) -> None:
        shape = self._shape(slots, capacity)
        spare, self._spare = self._spare, None
        if spare is not None and spare.covers(slots, capacity):  # taken whole, even if larger
            self._set_storage(spare.take())
            self._owners = [None] * spare.slots
            self.growths_prepared += 1
            return
        # small pages: huge ones, marked before the first touch, made each growth up to 5x slower
        # (a huge-page fault may compact memory), a stall of every request in the batch, for no
        # measurable decode gain (docs/benchmarks.md, "The KV pool's growth")
        self._set_storage(torch.zeros(shape, dtype=self.dtype, device=self.device))
        self._owners = [None] * slots

    def _resize(self, slots: int, capacity: int) -> None:
        old, owners = self._kv, self._owners
        keep_slots, keep_len = min(slots, old.shape[2]), min(capacity, old.shape[4])
        self.growths += 1
        self._allocate_storage(slots, capacity)
        self._kv[:, :, :keep_slots, :, :keep_len] = old[:, :, :keep_slots, :, :keep_len]
        self._owners[:keep_slots] = owners[:keep_slots]

    def fits(self, positions: int) -> bool:
        """Whether a request of `positions` positions can live in the pool."""
        return positions <= self.max_capacity

    def ensure_capacity(self, positions: int) -> None:
        """Grow every slot to hold at least `positions` positions (doubling)."""
        if positions <= self.capacity:
            if self._grow_ahead and positions >= GROW_AHEAD_POSITIONS_AT * self.capacity:
                self._prepare_growth(positions)
            return
        if not self.fits(positions):
            raise ValueError(f"{positions} positions exceed the pool's maximum of {self.max_capacity}")
        capacity = min(self.max_capacity, max(positions, 2 * self.capacity))
        self._resize(self.slots, capacity)

    # ------------------------------------------------------------------ slots
    def allocate(self, positions: int = 0) -> PooledKVCache:
        """A new empty cache in a free slot, with room for `positions` positions."""
        if self.slots == 0:
            self._allocate_storage(*self._initial)
        try:
            slot = self._owners.index(None)
        except ValueError:
            slot = self.slots
            self._resize(2 * self.slots, self.capacity)
        cache = PooledKVCache(self, slot)
        self._owners[slot] = cache
        self.ensure_capacity(positions)
        self._prepare_growth()
        return cache

    def _prepare_growth(self, positions: int = 0) -> None:
        """Start zero-filling the storage of the growths that are near (see the class docstring);
        `positions`: a reservation just made."""
        spare = self._spare
        if not self._grow_ahead or (spare is not None and spare.covers(
                2 * self.slots, min(self.max_capacity, 2 * self.capacity))):
            return  # nothing more to prepare (checked first: reservations call this every iteration)
        slots, capacity = self.slots, self.capacity
        if self.live >= GROW_AHEAD_SLOTS_AT * slots:
            slots *= 2
        if positions >= GROW_AHEAD_POSITIONS_AT * capacity:
            capacity = min(self.max_capacity, 2 * capacity)
        if (slots, capacity) == (self.slots, self.capacity) or (spare is not None and spare.covers(slots, capacity)):
            return
        if spare is not None:  # sizes only grow: prepare what both need
            slots, capacity = max(slots, spare.slots), max(capacity, spare.capacity)
        self._spare = _SpareStorage(self._shape(slots, capacity), self.dtype, self.device)

    def adopt(self, state: KVState | KVCache, spare: int = 16) -> PooledKVCache:
        """A cache in a free slot holding a copy of `state` (a `KVState` or a private `KVCache` of
        the pool's layers and heads), with room for `spare` more positions."""
        if isinstance(state, KVCache):
            keys = [k[:, : state.length] for k in state._keys]
            values = [v[:, : state.length] for v in state._values]
        else:
            keys, values = list(state.keys), list(state.values)
        if len(keys) != self.num_layers or state.layer_start != self.layer_start:
            raise ValueError("KV state does not cover the pool's layers")
        cache = self.allocate(state.length + spare)
        if state.length:
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                self._keys[i, cache.slot, :, : state.length] = k
                self._values[i, cache.slot, :, : state.length] = v
        cache.length = state.length
        return cache

    def _free(self, cache: PooledKVCache) -> None:
        if self._owners[cache.slot] is cache:
            self._owners[cache.slot] = None
        if self.live == 0:  # nothing left: give the memory back, start small next time
            self._set_storage(self._no_storage())
            self._owners, self._spare = [], None


class _SpareStorage:
    """A zero-filled pool storage of `shape`, being allocated on a background thread."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.slots, self.capacity = shape[2], shape[4]
        self._dtype, self._device = dtype, device
        self._tensor: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._fill, name="kv-pool-grow-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        self._tensor = torch.zeros(self.shape, dtype=self._dtype, device=self._device)

    def covers(self, slots: int, capacity: int) -> bool:
        """Whether this storage holds at least `slots` slots of `capacity` positions."""
        return self.slots >= slots and self.capacity >= capacity

    def take(self) -> torch.Tensor:
        """The storage (waits for the rest of the fill; allocated here if the thread failed)."""
        self._thread.join()
        if self._tensor is None:
            return torch.zeros(self.shape, dtype=self._dtype, device=self._device)
        return self._tensor


class PooledKVCache:
    """A request's KV cache living in one slot of a `KVPool`; same interface as `KVCache`."""

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.layer_start = pool.layer_start
        self.length = 0  #: positions whose keys/values are valid in every layer
        self.released = False

    @property
    def capacity(self) -> int:
        """Positions that fit before the pool grows."""
        return self.pool.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the valid part of the cache."""
        pool = self.pool
        element = torch.empty((), dtype=pool.dtype).element_size()
        return 2 * pool.num_layers * pool.num_kv_heads * self.length * pool.head_dim * element

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions (grows the whole pool when needed)."""
        self.pool.ensure_capacity(self.length + extra)

    def write_and_read(self, layer: int, keys: torch.Tensor, values: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new `[kv_heads, n, head_dim]` keys/values after the valid part; return all so far."""
        end = self.length + keys.shape[1]
        pool_keys, pool_values = self.pool.keys(layer)[self.slot], self.pool.values(layer)[self.slot]
        pool_keys[:, self.length:end] = keys
        pool_values[:, self.length:end] = values
        return pool_keys[:, :end], pool_values[:, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions valid."""
        self.length += n

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end), each ``[layers, kv_heads, n, head_dim]`` (a copy)."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"positions [{start}, {end}) are not all cached ({self.length} are)")
        return (self.pool._keys[:, self.slot, :, start:end].clone(),
                self.pool._values[:, self.slot, :, start:end].clone())

    def export(self) -> KVState:
        """Copy the valid part out as a `KVState`."""
        keys = self.pool._keys[:, self.slot, :, : self.length]
        values = self.pool._values[:, self.slot, :, : self.length]
        return KVState(self.layer_start, tuple(k.clone() for k in keys),
                       tuple(v.clone() for v in values), self.length)

    def release(self) -> None:
        """Give the slot back to the pool (the handle must not be used afterwards)."""
        if not self.released:
            self.released = True
            self.pool._free(self)
