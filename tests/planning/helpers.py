"""Helpers for the planning-core tests: tiny models, hypothesis settings, unit-level holdings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Position
from elastic_llm.planning.slices import Slice, SliceAlgebra

#: hypothesis settings for every property test here: few, deterministic examples (fast on 2 cores)
FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

Unit = tuple[int, str, int, int]  # (layer, part, batch, unit index)


def tiny_model(attention_bias: bool = False, tied: bool = False) -> ModelSpec:
    """4 layers, 4 heads / 2 KV heads of width 4, MLP 128 (two 64-granules), vocab 100."""
    return ModelSpec(name="tiny", model_type="llama", num_layers=4, hidden_size=16, num_heads=4,
                     num_kv_heads=2, head_dim=4, intermediate_size=128, vocab_size=100,
                     attention_bias=attention_bias, tie_word_embeddings=tied)


def smollm2() -> ModelSpec:
    """SmolLM2-135M's shape (9 heads, 3 KV heads, head dim 64, MLP 1536, 30 layers)."""
    return ModelSpec(name="smollm2-135m-instruct", model_type="llama", num_layers=30,
                     hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def units_of(pieces: list[Slice]) -> set[Unit]:
    """Explode slices into the set of individual units they cover."""
    return {(s.layer, s.part.value, s.batch, u) for s in pieces for u in range(s.start, s.stop)}


def unit_bytes(algebra: SliceAlgebra, units: set[Unit], tokens: dict[int, int]) -> int:
    """Bytes of a set of units (KV units weigh their batch's cached tokens)."""
    from elastic_llm.planning.slices import Part

    total = 0
    for _layer, part, batch, _u in units:
        size = algebra.unit_bytes(Part(part))
        total += size * tokens[batch] if batch >= 0 else size
    return total


def position_units(algebra: SliceAlgebra, config: ParallelConfig, pos: Position,
                   batch: int = -1, tokens: int = 0) -> set[Unit]:
    """Units a position holds (weights, plus KV of ``batch`` when ``tokens`` > 0)."""
    return units_of(algebra.position_slices(config, pos, batch, tokens))
