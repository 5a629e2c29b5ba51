"""Seeded synthetic request workloads: arrivals and (prompt, output) lengths.

Arrivals are Poisson (exponential gaps) or Gamma renewal processes with a chosen coefficient of
variation (CV > 1: burstier than Poisson). Lengths are resampled from bundled samples shaped like
ShareGPT (long prompts, long-tailed outputs) and Alpaca (short prompts and outputs).

The bundled samples (`data/sharegpt_like.csv`, `data/alpaca_like.csv`) are SYNTHETIC: no text or
record of either dataset is included. Each holds pairs drawn by `synthesize_length_sample` from
independent lognormal distributions whose means are the published averages of the two datasets
in the vLLM paper (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023, section 6.1 and Figure 11: ShareGPT 161.31 input / 337.99 output
tokens, Alpaca 19.31 / 58.45, OPT tokenizer). The lognormal spreads (sigma) are our own assumption,
chosen to give the long right tails those figures show; lengths are clipped the way vLLM's
`benchmark_serving` filters ShareGPT (prompt and output >= 4 tokens, prompt <= 1024, total <= 2048).
Input and output lengths are drawn independently (the real datasets correlate them weakly).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np

from elastic_llm.scheduling.heavy_tail import HEAVY_STATS, HeavyDataset

Dataset = Literal["sharegpt", "alpaca"]
#: Every bundled length sample: the two dataset-shaped ones and the heavy-tailed ones.
AnyDataset = Dataset | HeavyDataset
DATASETS: tuple[str, ...] = ("sharegpt", "alpaca", *HEAVY_STATS)


@dataclass(frozen=True)
class WorkloadItem:
    """One request of a workload."""

    arrival_s: float  #: arrival time (seconds from the workload's start)
    prompt_tokens: int  #: prompt length (tokens)
    output_tokens: int  #: tokens to generate
    #: the prompt's token ids where the workload has them (a prompt sample); () for length-only samples
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LengthStats:
    """Lognormal fit of one dataset's length distributions (means published, sigmas assumed)."""

    mean_prompt: float  #: published mean prompt length (tokens)
    mean_output: float  #: published mean output length (tokens)
    sigma_prompt: float  #: lognormal sigma of prompt lengths (our assumption)
    sigma_output: float  #: lognormal sigma of output lengths (our assumption)
    min_tokens: int = 4  #: shortest prompt and output kept
    max_prompt: int = 1024  #: longest prompt kept
    max_total: int = 2048  #: longest prompt + output kept


LENGTH_STATS: dict[Dataset, LengthStats] = {
    "sharegpt": LengthStats(
        mean_prompt=161.31, mean_output=337.99, sigma_prompt=1.1, sigma_output=1.0
    ),
    "alpaca": LengthStats(mean_prompt=19.31, mean_output=58.45, sigma_prompt=0.6, sigma_output=0.9),
}
SAMPLE_SIZE = 400  #: pairs in each bundled sample
#: seeds the bundled samples were drawn with
SAMPLE_SEED: dict[Dataset, int] = {"sharegpt": 20230607, "alpaca": 20230608}


def poisson_arrivals(rate_per_s: float, n: int, seed: int, start_s: float = 0.0) -> np.ndarray:
    """`n` arrival times (seconds, increasing) of a Poisson process of `rate_per_s`."""
    return gamma_arrivals(rate_per_s, 1.0, n, seed, start_s)


def gamma_arrivals(
    rate_per_s: float, cv: float, n: int, seed: int, start_s: float = 0.0
) -> np.ndarray:
    """`n` arrival times of a renewal process with Gamma gaps of mean 1/rate and CV `cv`.

    `cv=1` is a Poisson process; `cv>1` is burstier. Gamma shape = 1/cv**2.
    """
    if not rate_per_s > 0 or not cv > 0 or n < 0:
        raise ValueError("need rate_per_s > 0, cv > 0 and n >= 0")
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), size=n)
    return start_s + np.cumsum(gaps)


def synthesize_length_sample(stats: LengthStats, n: int, seed: int) -> np.ndarray:
    """`n` synthetic (prompt, output) length pairs, shape (n, 2) int64, from `stats`' lognormals.

    A lognormal with mean m and spread sigma has mu = ln(m) - sigma**2 / 2. Pairs outside the
    clipping window are redrawn (rejection), so the mean ends somewhat below the published one.
    """
    rng = np.random.default_rng(seed)
    mu_p = math.log(stats.mean_prompt) - stats.sigma_prompt**2 / 2
    mu_o = math.log(stats.mean_output) - stats.sigma_output**2 / 2
    rows: list[tuple[int, int]] = []
    while len(rows) < n:
        prompt = int(round(rng.lognormal(mu_p, stats.sigma_prompt)))
        output = int(round(rng.lognormal(mu_o, stats.sigma_output)))
        if min(prompt, output) < stats.min_tokens or prompt > stats.max_prompt:
            continue
        if prompt + output > stats.max_total:
            continue
        rows.append((prompt, output))
    return np.asarray(rows, dtype=np.int64).reshape(n, 2)


def format_length_sample(dataset: Dataset, pairs: np.ndarray) -> str:
    """The CSV text of a bundled sample (header comments, then `prompt_tokens,output_tokens`)."""
    stats = LENGTH_STATS[dataset]
    lines = [
        f"# SYNTHETIC {dataset}-like length sample: NOT records of the dataset.",
        "# Drawn by elastic_llm.scheduling.workloads.synthesize_length_sample with",
        f"# LENGTH_STATS[{dataset!r}] = {stats}, n={len(pairs)}, seed={SAMPLE_SEED[dataset]}.",
        "# Means from Kwon et al., SOSP 2023 (vLLM), section 6.1 / Figure 11; sigmas assumed.",
        "prompt_tokens,output_tokens",
    ]
    lines += [f"{int(p)},{int(o)}" for p, o in pairs]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def load_length_sample(dataset: AnyDataset) -> tuple[tuple[int, int], ...]:
    """The bundled (prompt_tokens, output_tokens) pairs for `dataset` (one of `DATASETS`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    filename = f"{dataset}_like.csv" if dataset in LENGTH_STATS else f"{dataset}.csv"
    path = resources.files("elastic_llm.scheduling").joinpath("data", filename)
    text = path.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    pairs = (row.split(",") for row in rows[1:])  # rows[0] is the column header
    return tuple((int(p), int(o)) for p, o in pairs)


def make_workload(
    n: int,
    rate_per_s: float,
    dataset: AnyDataset = "sharegpt",
    *,
    cv: float = 1.0,
    seed: int = 0,
    start_s: float = 0.0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> tuple[WorkloadItem, ...]:
    """`n` requests: Gamma arrivals (`cv=1`: Poisson) and lengths resampled from the bundled sample.

    Arrivals and lengths use independent streams of `seed`, so the same seed gives the same
    lengths at every rate and CV (compare policies and loads on identical requests). The optional
    caps clip lengths (e.g. to keep a CPU benchmark short) without changing which pairs are drawn.
    """
    arrival_seed, length_seed = np.random.SeedSequence(seed).spawn(2)
    arrivals = gamma_arrivals(rate_per_s, cv, n, int(arrival_seed.generate_state(1)[0]), start_s)
    sample = load_length_sample(dataset)
    picks = np.random.default_rng(length_seed).integers(0, len(sample), size=n)
    items: list[WorkloadItem] = []
    for arrival, index in zip(arrivals, picks):
        prompt, output = sample[int(index)]
        if max_prompt_tokens is not None:
            prompt = min(prompt, max_prompt_tokens)
        if max_output_tokens is not None:
            output = min(output, max_output_tokens)
        items.append(WorkloadItem(float(arrival), prompt, output))
    return tuple(items)
