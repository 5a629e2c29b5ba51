"""The bundled prompt sample (prompts and the default model's measured answer lengths), its
workloads, and what the predictor learns from it on held-out prompts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from elastic_llm.scheduling.prompt_sample import (
    bundled_length_predictor,
    fit_length_predictor,
    load_prompt_sample,
    prompt_workload,
    split_prompt_sample,
)


def test_the_sample_holds_twelve_families_of_answered_prompts() -> None:
    rows = load_prompt_sample()
    assert len(rows) == 480
    assert len({r.family for r in rows}) == 12
    assert len({r.prompt for r in rows}) == len(rows)
    for row in rows:
        assert row.prompt_token_ids and 1 <= row.output_tokens <= 512
        assert row.finish in ("stop", "length")
        assert (row.finish == "length") == (row.output_tokens == 512)
    by_family = {f: np.mean([r.output_tokens for r in rows if r.family == f]) for f in {r.family for r in rows}}
    assert by_family["essay"] > 5 * by_family["one-word"]  # the prompt carries the answer's length


def test_the_split_is_seeded_and_disjoint() -> None:
    rows = load_prompt_sample()
    train, test = split_prompt_sample(rows, seed=3)
    assert (train, test) == split_prompt_sample(rows, seed=3)
    assert len(train) + len(test) == len(rows)
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    with pytest.raises(ValueError):
        split_prompt_sample(rows, train_share=1.0)


def test_a_predictor_fitted_on_half_ranks_the_other_half() -> None:
    train, test = split_prompt_sample(load_prompt_sample(), seed=0)
    predictor = fit_length_predictor(train)
    predicted = [predictor.predict_log_length(r.prompt_token_ids) for r in test]
    assert spearmanr(predicted, [r.output_tokens for r in test]).statistic > 0.6
    labels = [predictor.classify(r.prompt_token_ids) for r in test]
    means = [np.mean([r.output_tokens for r, label in zip(test, labels) if label == c])
             for c in range(predictor.classes) if c in labels]
    assert len(means) == predictor.classes == 4
    assert means == sorted(means)  # held-out classes come out in order of length
    assert bundled_length_predictor().classes == predictor.classes


def test_workloads_carry_prompts_and_follow_the_family_weights() -> None:
    rows = load_prompt_sample()
    items = prompt_workload(rows, 300, 2.0, cv=4.0, seed=1, family_weights={"essay": 1.0, "one-word": 3.0})
    by_prompt = {r.prompt_token_ids: r for r in rows}
    families = [by_prompt[i.prompt_token_ids].family for i in items]
    assert set(families) == {"essay", "one-word"}
    assert 0.65 < families.count("one-word") / len(families) < 0.85
    assert all(i.output_tokens == by_prompt[i.prompt_token_ids].output_tokens for i in items)
    assert all(i.prompt_tokens == len(i.prompt_token_ids) for i in items)
    assert list(np.diff([i.arrival_s for i in items]) >= 0) == [True] * (len(items) - 1)
    with pytest.raises(ValueError, match="unknown"):
        prompt_workload(rows, 10, 1.0, family_weights={"sonnet": 1.0})
    with pytest.raises(ValueError, match="no row"):
        prompt_workload(rows, 10, 1.0, family_weights={"essay": 0.0})
