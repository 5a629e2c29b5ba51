"""Workload generators and the bundled synthetic length samples; the prefill predictor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from elastic_llm.scheduling import LinearPrefillPredictor, WorkloadItem, make_workload
from elastic_llm.scheduling.workloads import (
    LENGTH_STATS,
    SAMPLE_SEED,
    SAMPLE_SIZE,
    format_length_sample,
    gamma_arrivals,
    load_length_sample,
    poisson_arrivals,
    synthesize_length_sample,
)


def cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_poisson_arrivals_rate_and_cv() -> None:
    times = poisson_arrivals(5.0, 20_000, seed=1)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert cv(gaps) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("target_cv", [0.5, 2.0, 4.0])
def test_gamma_arrivals_have_the_requested_cv(target_cv: float) -> None:
    gaps = np.diff(np.concatenate([[0.0], gamma_arrivals(2.0, target_cv, 50_000, seed=7)]))
    assert gaps.mean() == pytest.approx(0.5, rel=0.06)
    assert cv(gaps) == pytest.approx(target_cv, rel=0.1)


def test_arrivals_validate_and_offset() -> None:
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 1.0, 3, seed=0)
    with pytest.raises(ValueError):
        gamma_arrivals(1.0, 0.0, 3, seed=0)
    assert np.all(poisson_arrivals(1.0, 5, seed=0, start_s=10.0) > 10.0)


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_bundled_sample_is_reproducible_from_its_documented_fit(dataset: str) -> None:
    pairs = load_length_sample(dataset)  # type: ignore[arg-type]
    assert len(pairs) == SAMPLE_SIZE
    stats, seed = LENGTH_STATS[dataset], SAMPLE_SEED[dataset]  # type: ignore[index]
    regenerated = synthesize_length_sample(stats, SAMPLE_SIZE, seed)
    assert np.array_equal(np.asarray(pairs), regenerated)
    text = format_length_sample(dataset, regenerated)  # type: ignore[arg-type]
    assert text.count("\n") == SAMPLE_SIZE + 5


@pytest.mark.parametrize("dataset", ["sharegpt", "alpaca"])
def test_bundled_sample_matches_published_means_and_is_long_tailed(dataset: str) -> None:
    stats = LENGTH_STATS[dataset]  # type: ignore[index]
    arr = np.asarray(load_length_sample(dataset))  # type: ignore[arg-type]
    assert arr[:, 0].mean() == pytest.approx(stats.mean_prompt, rel=0.2)
    assert arr[:, 1].mean() == pytest.approx(stats.mean_output, rel=0.2)
    assert np.percentile(arr[:, 1], 99) > 4 * np.median(arr[:, 1])  # long right tail
    assert arr.min() >= stats.min_tokens
    assert arr[:, 0].max() <= stats.max_prompt and arr.sum(axis=1).max() <= stats.max_total


def test_sharegpt_is_longer_than_alpaca() -> None:
    share = np.asarray(load_length_sample("sharegpt")).mean(axis=0)
    alpaca = np.asarray(load_length_sample("alpaca")).mean(axis=0)
    assert np.all(share > 4 * alpaca)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError):
        load_length_sample("dolly")  # type: ignore[arg-type]


def test_make_workload_is_seeded_and_lengths_do_not_depend_on_load() -> None:
    low = make_workload(50, 1.0, "sharegpt", seed=11)
    high = make_workload(50, 9.0, "sharegpt", seed=11, cv=3.0)
    assert low == make_workload(50, 1.0, "sharegpt", seed=11)
    assert low != make_workload(50, 1.0, "sharegpt", seed=12)
    assert [(i.prompt_tokens, i.output_tokens) for i in low] == [
        (i.prompt_tokens, i.output_tokens) for i in high
    ]
    assert all(isinstance(i, WorkloadItem) for i in low)
    arrivals = [i.arrival_s for i in high]
    assert arrivals == sorted(arrivals)
    with pytest.raises(dataclasses.FrozenInstanceError):
        low[0].prompt_tokens = 3  # type: ignore[misc]


def test_make_workload_caps() -> None:
    capped = make_workload(200, 5.0, "sharegpt", seed=2, max_prompt_tokens=64, max_output_tokens=32)
    assert max(i.prompt_tokens for i in capped) == 64
    assert max(i.output_tokens for i in capped) == 32


def test_linear_predictor_fits_a_line() -> None:
    samples = [(t, 0.002 + 0.0001 * t) for t in (16, 64, 256, 1024)]
    fit = LinearPrefillPredictor.fit(samples)
    assert fit.intercept_s == pytest.approx(0.002)
    assert fit.per_token_s == pytest.approx(0.0001)
    assert fit(512) == pytest.approx(0.0532)


def test_linear_predictor_fallbacks() -> None:
    through_origin = LinearPrefillPredictor.fit([(10, 0.0), (20, 0.5), (30, 1.0)])
    assert through_origin.intercept_s == 0.0 and through_origin.per_token_s > 0
    single_length = LinearPrefillPredictor.fit([(100, 0.1), (100, 0.3)])
    assert single_length(100) == pytest.approx(0.2)
    decreasing = LinearPrefillPredictor.fit([(10, 0.3), (20, 0.1)])
    assert decreasing(5) == pytest.approx(0.2) and decreasing.per_token_s == 0.0
    with pytest.raises(ValueError):
        LinearPrefillPredictor.fit([])
    with pytest.raises(ValueError):
        LinearPrefillPredictor.fit([(-1, 0.1)])
    with pytest.raises(ValueError):
        LinearPrefillPredictor(-1.0, 0.0)
