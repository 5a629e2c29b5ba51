"""The Gittins index table and the bundled heavy-tailed length samples."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from elastic_llm.scheduling.gittins import GittinsTable
from elastic_llm.scheduling.heavy_tail import (
    HEAVY_STATS,
    HeavyTailStats,
    format_heavy_sample,
    synthesize_heavy_sample,
)
from elastic_llm.scheduling.workloads import load_length_sample, make_workload


def test_gittins_index_of_known_distributions() -> None:
    assert GittinsTable.fit([1] * 10)(0) == pytest.approx(1.0)  # finishes in one token, surely
    equal = GittinsTable.fit([5] * 10)  # rising hazard: the index rises with service
    assert [equal(a) for a in range(5)] == pytest.approx([1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0])
    # half finish after 1 token, half after 10: best to try the first token first, then it falls
    mixed = GittinsTable.fit([1] * 50 + [10] * 50)
    assert mixed(0) == pytest.approx(0.5) and mixed(1) == pytest.approx(1 / 9)
    assert mixed(10_000) == mixed(9)


def test_gittins_index_falls_for_a_pareto_sample() -> None:
    lengths = np.asarray(load_length_sample("pareto-cv3"))[:, 1]
    table = GittinsTable.fit([max(4, round(n * 0.15)) for n in lengths])
    assert table(4) > table(20) > table(100)


def test_gittins_refuses_bad_samples() -> None:
    with pytest.raises(ValueError):
        GittinsTable.fit([])
    with pytest.raises(ValueError):
        GittinsTable.fit([3, 0])


def _rows(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in line.split(",")) for line in text.splitlines()
            if line and not line.startswith("#") and line[0].isdigit()]


@pytest.mark.parametrize("name", list(HEAVY_STATS))
def test_bundled_heavy_samples_reproduce_and_hit_their_cv(name: str) -> None:
    stats = HEAVY_STATS[name]
    pairs = synthesize_heavy_sample(stats)
    text = resources.files("elastic_llm.scheduling").joinpath("data", f"{name}.csv").read_text("utf-8")
    regenerated = format_heavy_sample(name, pairs)  # type: ignore[arg-type]
    # the same sample up to rounding: the fitted shape may differ in its last bits between numpy
    # and scipy releases, which moves a value that lies near .5 by one token
    bundled_rows, fresh_rows = (_rows(t) for t in (text, regenerated))
    assert [line for line in text.splitlines() if line.startswith("#")] == \
        [line for line in regenerated.splitlines() if line.startswith("#")]
    assert len(bundled_rows) == len(fresh_rows) == len(pairs)
    differing = [(a, b) for a, b in zip(bundled_rows, fresh_rows, strict=True) if a != b]
    assert len(differing) <= len(pairs) // 100
    assert all(abs(x - y) <= 1 for a, b in differing for x, y in zip(a, b, strict=True))
    outputs = np.asarray(load_length_sample(name))[:, 1].astype(float)  # type: ignore[arg-type]
    assert outputs.std() / outputs.mean() == pytest.approx(stats.target_cv, rel=0.01)
    assert outputs.mean() == pytest.approx(stats.mean_output, rel=0.01)
    assert stats.min_output <= outputs.min() and outputs.max() <= stats.max_output


def test_heavy_workload_is_bursty_and_unreachable_cv_is_refused() -> None:
    items = make_workload(2000, 1.0, "lognormal-cv3", cv=4.0, seed=1)
    gaps = np.diff([0.0] + [i.arrival_s for i in items])
    assert gaps.std() / gaps.mean() > 3.0
    with pytest.raises(ValueError, match="out of reach"):
        synthesize_heavy_sample(HeavyTailStats("pareto", 9.0, seed=1, max_output=400), n=200)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_length_sample("pareto-cv9")  # type: ignore[arg-type]


def test_running_requests_count_as_censored_lengths() -> None:
    """Two finished at 2 tokens, two still running past 9: the tail is not forgotten."""
    finished_only = GittinsTable.fit([2, 2])
    censored = GittinsTable.fit([2, 2], censored=[9, 9])
    assert finished_only(0) == pytest.approx(0.5)  # surely done after 2 tokens
    assert censored(0) == pytest.approx(0.5 * 1 / 2)  # half of them are long: half the index
    assert len(censored.index) == 10  # the censored mass sits one past the longest running one
