"""Timing our engine's compute: one tensor rank's shard of a decoder layer, and the embedding/head.

Everything runs through the engine's own classes: a `LlamaNetwork` holding one layer (or none, for
the embedding + final norm + LM head) read lazily from the checkpoint's safetensors, fed a flat
batch of `SequenceSlice`s whose `KVCache`s are set up as the engine sets them up (created with
room for the new tokens, reserved, written by the layer). Repetitions write the same cache
positions (the caches are never advanced), so every repetition does the same work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic_llm.model.checkpoint import resolve_checkpoint
from elastic_llm.model.kv_cache import KVCache
from elastic_llm.model.layers import Rotary, SequenceSlice, TensorShard
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.engine.replica.layout import tensor_shard
from elastic_llm.model.loader import build_rotary, read_spec
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights

#: Spare KV positions a new cache gets beyond its first tokens (as `LocalExecutor` allocates).
_CACHE_SPARE = 16


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint opened for lazy, sliced reads (no network built yet)."""

    spec: ModelSpec  #: the model's shapes
    config: dict[str, object]  #: its config.json
    weights: SafetensorsWeights  #: lazy safetensors reader
    path: Path  #: checkpoint directory

    def rotary(self) -> Rotary:
        """A fresh rotary embedding for this model."""
        return build_rotary(self.config, self.spec)


def open_checkpoint(name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
                    ) -> Checkpoint:
    """Resolve and open a checkpoint as `load_model` does, without reading any tensor.

    Raises:
        ModelLoadError: unknown name or path, unreadable files.
        UnsupportedModelError: an architecture our engine does not execute.
    """
    path = resolve_checkpoint(name_or_path)
    config, spec = read_spec(path, Path(os.fspath(name_or_path)).name, dtype)
    return Checkpoint(spec, config, SafetensorsWeights(path), path)


def rank_shard(spec: ModelSpec, degree: int, rank: int = 0) -> TensorShard:
    """The heads, MLP columns and LM-head rows tensor ``rank`` of ``degree`` holds, in DeepSpeed
    AutoTP's layout (the sharded replica's own `tensor_shard`); rank 0 holds the largest shard."""
    return tensor_shard(spec, degree, rank)


def layer_network(checkpoint: Checkpoint, layer: int, shard: TensorShard,
                  dtype: torch.dtype = torch.float32) -> LlamaNetwork:
    """Decoder layer ``layer`` as held by the rank owning ``shard`` (no embedding, no head)."""
    return LlamaNetwork.from_checkpoint(
        checkpoint.spec, checkpoint.rotary(), checkpoint.weights, dtype=dtype,
        layers=range(layer, layer + 1), shard=shard, has_embedding=False, has_head=False)


def head_network(checkpoint: Checkpoint, shard: TensorShard,
                 dtype: torch.dtype = torch.float32) -> LlamaNetwork:
    """The embedding (whole), final norm and the LM-head rows of ``shard``, without any layer."""
    return LlamaNetwork.from_checkpoint(checkpoint.spec, checkpoint.rotary(), checkpoint.weights,
                                        dtype=dtype, layers=range(0, 0), shard=shard)


def forward_call(network: LlamaNetwork, batch: int, new_tokens: int, context: int,
                 seed: int = 0) -> Callable[[], torch.Tensor]:
    """A call running ``network``'s forward pass over ``batch`` requests computing ``new_tokens``
    tokens each on top of ``context`` cached tokens (prefill: context 0; decode: new_tokens 1).
    Inputs are token ids when the network embeds, else random hidden states; the LM head (if
    held) computes the last row of each request, as the engine asks. Every call does the same
    work (the caches are not advanced)."""
    spec = network.spec
    generator = torch.Generator().manual_seed(seed)
    dtype = next(network.parameters()).dtype
    rows = batch * new_tokens
    if network.embed is not None:
        inputs = torch.randint(spec.vocab_size, (rows,), generator=generator)
    else:
        inputs = torch.randn(rows, spec.hidden_size, generator=generator).to(dtype)
    positions = torch.arange(context, context + new_tokens).repeat(batch)
    seqs = ([SequenceSlice(i * new_tokens, new_tokens,
                           _filled_cache(network, context, new_tokens, generator))
             for i in range(batch)] if len(network.layers) else [])
    logit_rows = (torch.arange(new_tokens - 1, rows, new_tokens)
                  if network.lm_head is not None else None)
    return lambda: network(inputs, positions, seqs, logit_rows)


def _filled_cache(network: LlamaNetwork, context: int, new_tokens: int,
                  generator: torch.Generator) -> KVCache:
    """A cache for the network's layers with ``context`` random cached positions and room
    reserved for ``new_tokens`` more."""
    spec, kv_heads = network.spec, network.shard.num_kv_heads
    dtype = next(network.parameters()).dtype
    start, count = network.layer_range.start, len(network.layer_range)
    cache = KVCache(start, count, kv_heads, spec.head_dim, dtype, torch.device("cpu"),
                    capacity=context + new_tokens + _CACHE_SPARE)
    if context:
        for layer in network.layer_range:
            keys, values = (torch.randn(kv_heads, context, spec.head_dim, generator=generator)
                            .to(dtype) for _ in range(2))
            cache.write_and_read(layer, keys, values)
        cache.advance(context)
    cache.reserve(new_tokens)
    return cache
