"""Per-request KV cache and its plain-tensor export (`KVState`).

A request's cache holds, for each layer of the process's layer range, keys and values shaped
``[kv_heads, capacity, head_dim]``; the first ``length`` positions are valid. Capacity grows by
doubling so appends are amortised O(1) and reads are views (no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
