"""Token selection. Randomness for output token t of a request depends only on (seed, t)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elastic_llm.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, step: int) -> int:
    """A 63-bit seed for output token `step` of a request seeded `seed` (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  steps: Sequence[int]) -> list[int]:
    """Pick one token per row of `logits` [S, V]; row i follows `params[i]` at output step `steps[i]`."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if not p.greedy:
            assert p.seed is not None, "the engine fixes every sampled request's seed"
            chosen[row] = _sample_one(logits[row], p, token_seed(p.seed, step))
    return chosen


def _sample_one(logits: torch.Tensor, params: SamplingParams, seed: int) -> int:
    scaled = logits.float() / params.temperature
    if params.top_k:
        k = min(params.top_k, scaled.shape[-1])
        kth = torch.topk(scaled, k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    if params.top_p < 1.0:
        keep = cumulative - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        cumulative = torch.cumsum(sorted_probs, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((), generator=generator).item() * cumulative[-1].item()
    index = int(torch.searchsorted(cumulative, torch.tensor([u], dtype=cumulative.dtype)).item())
    return int(order[min(index, order.shape[0] - 1)].item())
