"""KV by slice: cut a request's `KVState` to a layer range x KV-head range, and assemble one back.

A process of a P x M replica holds, for each request, the KV of its stage's layers and its rank's
KV heads: one block. Moving a paused request to another (P, M) re-slices those blocks: `slice_kv`
cuts the block a new position needs out of whatever covers it, `merge_kv` assembles a block from
pieces (the process's own old block and the pieces peers sent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elastic_llm.model.kv_cache import KVState


def kv_layers(state: KVState) -> range:
    """Layers `state` holds."""
    return range(state.layer_start, state.layer_start + len(state.keys))


def kv_heads(state: KVState) -> tuple[int, int]:
    """KV heads ``[start, stop)`` `state` holds."""
    count = state.keys[0].shape[0] if state.keys else 0
    return (state.head_start, state.head_start + count)


def slice_kv(state: KVState, layers: range, heads: tuple[int, int]) -> KVState:
    """The part of `state` for `layers` x `heads` (views; raises ValueError if not held)."""
    held_layers, (h0, h1) = kv_layers(state), kv_heads(state)
    if layers.start < held_layers.start or layers.stop > held_layers.stop:
        raise ValueError(f"layers {layers} not within held {held_layers}")
    if heads[0] < h0 or heads[1] > h1 or heads[0] > heads[1]:
        raise ValueError(f"KV heads {heads} not within held {(h0, h1)}")
    idx = slice(layers.start - state.layer_start, layers.stop - state.layer_start)
    cut = slice(heads[0] - h0, heads[1] - h0)
    return KVState(layers.start, tuple(k[cut] for k in state.keys[idx]),
                   tuple(v[cut] for v in state.values[idx]), state.length, heads[0])


def merge_kv(pieces: Sequence[KVState], layers: range, heads: tuple[int, int],
             head_dim: int, length: int | None = None) -> KVState:
    """Assemble the `layers` x `heads` block from `pieces` (all of one request, one length).

    `length` (the request's cached tokens) is required to build an empty-heads block (a rank
    holding no KV heads) from no pieces at all; when given, every piece must have it.

    Raises:
        ValueError: the pieces disagree on the length or do not cover the block.
    """
    lengths = {p.length for p in pieces} | ({length} if length is not None else set())
    if len(lengths) != 1:
        raise ValueError(f"KV pieces of different lengths {sorted(lengths)}")
    length = lengths.pop()
    keys, values = [], []
    for layer in layers:
        covering = sorted((p for p in pieces if layer in kv_layers(p) and kv_heads(p)[1] > kv_heads(p)[0]),
                          key=lambda p: p.head_start)
        k_parts, v_parts, cursor = [], [], heads[0]
        for p in covering:
            lo, hi = kv_heads(p)
            if lo <= cursor < hi and cursor < heads[1]:
                end = min(hi, heads[1])
                block = slice_kv(p, range(layer, layer + 1), (cursor, end))
                k_parts.append(block.keys[0])
                v_parts.append(block.values[0])
                cursor = end
        if cursor < heads[1]:
            raise ValueError(f"KV of layer {layer}, heads {heads} not covered (missing from head {cursor})")
        if not k_parts:  # a rank holding no KV heads
            like = pieces[0].keys[0] if pieces and pieces[0].keys else torch.empty(0)
            empty = like.new_empty((0, length, head_dim))
            k_parts, v_parts = [empty], [empty]
        keys.append(torch.cat(k_parts).contiguous() if len(k_parts) > 1 else k_parts[0].contiguous())
        values.append(torch.cat(v_parts).contiguous() if len(v_parts) > 1 else v_parts[0].contiguous())
    return KVState(layers.start, tuple(keys), tuple(values), length, heads[0])


def full_kv_check(state: KVState, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
    """Raise ValueError unless `state` holds every layer and every KV head (the executor contract)."""
    shape = (num_kv_heads, state.length, head_dim)
    if (state.layer_start != 0 or state.head_start != 0 or len(state.keys) != num_layers
            or len(state.values) != num_layers
            or any(tuple(t.shape) != shape for t in (*state.keys, *state.values))):
        raise ValueError(f"KV state is not a full cache of {num_layers} layers x {num_kv_heads} "
                         f"KV heads x {head_dim} (layer_start {state.layer_start}, "
                         f"{len(state.keys)} layers)")
