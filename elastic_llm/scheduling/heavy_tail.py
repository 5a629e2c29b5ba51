"""Bundled heavy-tailed length samples: Pareto (Lomax) and lognormal output lengths of a chosen CV.

The ShareGPT- and Alpaca-shaped samples (`workloads.py`) have output lengths with a coefficient
of variation (CV) of about 1, close to exponential: a size-blind scheduler cannot gain much there.
These samples stretch the tail, which is where least-attained-service orders should win:

- "pareto-cv1.5", "pareto-cv3": Lomax (Pareto type II) output lengths, whose hazard rate
  `alpha / (scale + x)` falls everywhere (the longer a request has run, the longer it will run);
- "lognormal-cv1.5", "lognormal-cv3": lognormal output lengths (hazard rises, then falls).

Prompts are ShareGPT-shaped (lognormal, mean 161.31 tokens, sigma 1.1) and drawn independently of
the outputs, as in the other samples. Every sample has `HEAVY_SAMPLE_SIZE` rows, a mean output of
`mean_output` tokens, outputs in [4, `max_output`], and exactly (to 1%) the target CV *after*
rounding and clipping: `synthesize_heavy_sample` searches the distribution's shape parameter and
scale for that. Combine with `gamma_arrivals(cv=2..8)` for bursty heavy-tailed workloads
(`make_workload(dataset="pareto-cv3", cv=4)`).

SYNTHETIC: no record of any dataset. Regenerate with `format_heavy_sample(name,
synthesize_heavy_sample(HEAVY_STATS[name]))`; a test checks the bundled files match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtri

HeavyDataset = Literal["pareto-cv1.5", "pareto-cv3", "lognormal-cv1.5", "lognormal-cv3"]
OutputShape = Literal["pareto", "lognormal"]

HEAVY_SAMPLE_SIZE = 1000  #: rows in each bundled heavy-tailed sample


@dataclass(frozen=True)
class HeavyTailStats:
    """How one heavy-tailed sample is drawn."""

    shape: OutputShape  #: output-length family: Lomax ("pareto") or lognormal
    target_cv: float  #: CV of the output lengths after rounding and clipping
    seed: int  #: seed of the draw
    mean_output: float = 300.0  #: mean output length (tokens), about ShareGPT's
    max_output: int = 4000  #: longest output kept (clipped, not redrawn)
    min_output: int = 4  #: shortest output kept
    mean_prompt: float = 161.31  #: ShareGPT's published mean prompt (tokens)
    sigma_prompt: float = 1.1  #: lognormal sigma of prompts (as the ShareGPT-like sample)
    max_prompt: int = 1024  #: longest prompt kept (clipped)

    def __post_init__(self) -> None:
        if not self.target_cv > 0 or not self.mean_output > self.min_output:
            raise ValueError("need target_cv > 0 and mean_output > min_output")
        if self.max_output <= self.mean_output:
            raise ValueError("max_output must exceed mean_output")


HEAVY_STATS: dict[HeavyDataset, HeavyTailStats] = {
    "pareto-cv1.5": HeavyTailStats("pareto", 1.5, seed=20261203),
    "pareto-cv3": HeavyTailStats("pareto", 3.0, seed=20261204, max_output=10000),
    "lognormal-cv1.5": HeavyTailStats("lognormal", 1.5, seed=20261205),
    "lognormal-cv3": HeavyTailStats("lognormal", 3.0, seed=20261206, max_output=10000),
}


def _unit_draws(shape: OutputShape, parameter: float, uniforms: np.ndarray) -> np.ndarray:
    """Quantiles of the unit-scale distribution at `uniforms` (Lomax alpha, or lognormal sigma)."""
    if shape == "pareto":
        return (1.0 - uniforms) ** (-1.0 / parameter) - 1.0  # Lomax with scale 1
    return np.exp(parameter * ndtri(uniforms))  # ndtri: the standard normal's quantile


def _clipped(stats: HeavyTailStats, unit: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.round(unit * scale), stats.min_output, stats.max_output)


def _scaled_to_mean(stats: HeavyTailStats, unit: np.ndarray) -> np.ndarray:
    """`unit` scaled (bisection on the scale) so that the clipped lengths have `mean_output`."""
    low, high = 1e-6, 1e7
    for _ in range(100):
        middle = math.sqrt(low * high)
        if _clipped(stats, unit, middle).mean() < stats.mean_output:
            low = middle
        else:
            high = middle
    return _clipped(stats, unit, math.sqrt(low * high))


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def synthesize_heavy_sample(stats: HeavyTailStats, n: int = HEAVY_SAMPLE_SIZE) -> np.ndarray:
    """`n` (prompt, output) pairs, shape (n, 2) int64, outputs at `stats`' mean and CV.

    Raises ValueError when the target CV is out of reach within [min_output, max_output].
    """
    rng = np.random.default_rng(stats.seed)
    uniforms = np.clip(rng.random(n), 1e-12, 1.0 - 1e-12)
    # CV falls as Lomax alpha rises and rises with lognormal sigma: bisect on the parameter.
    low, high = (1.01, 50.0) if stats.shape == "pareto" else (0.05, 4.0)
    for _ in range(80):
        middle = (low + high) / 2
        cv = _cv(_scaled_to_mean(stats, _unit_draws(stats.shape, middle, uniforms)))
        too_heavy = cv > stats.target_cv
        if (stats.shape == "pareto") == too_heavy:
            low = middle
        else:
            high = middle
    outputs = _scaled_to_mean(stats, _unit_draws(stats.shape, (low + high) / 2, uniforms))
    if abs(_cv(outputs) - stats.target_cv) > 0.01 * stats.target_cv:
        raise ValueError(f"CV {stats.target_cv} is out of reach for {stats}")
    mu = math.log(stats.mean_prompt) - stats.sigma_prompt**2 / 2
    prompts = np.clip(np.round(rng.lognormal(mu, stats.sigma_prompt, size=n)), 4, stats.max_prompt)
    return np.stack([prompts, outputs], axis=1).astype(np.int64)


def format_heavy_sample(name: HeavyDataset, pairs: np.ndarray) -> str:
    """The CSV text of a bundled heavy-tailed sample (header comments, then the pairs)."""
    outputs = pairs[:, 1].astype(float)
    lines = [
        f"# SYNTHETIC {name} length sample: NOT records of any dataset.",
        "# Drawn by elastic_llm.scheduling.heavy_tail.synthesize_heavy_sample with",
        f"# HEAVY_STATS[{name!r}] = {HEAVY_STATS[name]}, n={len(pairs)}.",
        f"# Output mean {outputs.mean():.1f} tokens, CV {_cv(outputs):.3f}.",
        "prompt_tokens,output_tokens",
    ]
    lines += [f"{int(p)},{int(o)}" for p, o in pairs]
    return "\n".join(lines) + "\n"
