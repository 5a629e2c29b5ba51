"""The bundled prompt sample: templated prompts with the output lengths the default model gave them.

`data/smollm2_prompt_lengths.csv` was made by `benchmarks/make_prompt_length_sample.py`: twelve task
families (one-word answers, yes/no, arithmetic, translation, definitions, lists, explanations,
code, emails, stories, essays, haiku), their prompts SYNTHETIC (templates and word lists), each
answered by SmolLM2-135M-Instruct on our engine (chat-formatted, greedy, at most 512 new tokens).
Unlike the length-only samples (`workloads.py`, `heavy_tail.py`), the prompt here carries
information about the answer's length, which is what an output-length predictor
(`length_predictor.PromptLengthPredictor`, "las-predicted") needs.

Reads only the package's own data file (as `workloads.load_length_sample` does); no clock.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from elastic_llm.scheduling.length_predictor import PromptLengthPredictor
from elastic_llm.scheduling.workloads import WorkloadItem, gamma_arrivals

SAMPLE_FILE = "smollm2_prompt_lengths.csv"  #: the bundled sample, in `elastic_llm/scheduling/data/`
#: the model that answered the bundled prompts (its lengths hold for this model only)
SAMPLE_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PromptSampleRow:
    """One bundled prompt and what the model answered it with."""

    family: str  #: task family of the template (e.g. "one-word", "essay")
    prompt: str  #: the user's message
    prompt_token_ids: tuple[int, ...]  #: the chat-formatted prompt as the engine saw it
    output_tokens: int  #: tokens the model generated (greedy)
    finish: str  #: "stop" (the model ended) or "length" (cut at the cap)


@functools.lru_cache(maxsize=1)
def load_prompt_sample() -> tuple[PromptSampleRow, ...]:
    """Every row of the bundled prompt sample, in file order."""
    text = resources.files("elastic_llm.scheduling").joinpath("data", SAMPLE_FILE).read_text(encoding="utf-8")
    return tuple(
        PromptSampleRow(row["family"], row["prompt"], tuple(int(t) for t in row["prompt_token_ids"].split()),
                        int(row["output_tokens"]), row["finish"])
        for row in csv.DictReader(io.StringIO(text))
    )


def split_prompt_sample(rows: Sequence[PromptSampleRow], train_share: float = 0.5,
                        seed: int = 0) -> tuple[tuple[PromptSampleRow, ...], tuple[PromptSampleRow, ...]]:
    """(train, test): a seeded random split, `train_share` of the rows to train."""
    if not 0 < train_share < 1 or len(rows) < 2:
        raise ValueError("need 0 < train_share < 1 and at least 2 rows")
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = min(len(rows) - 1, max(1, round(train_share * len(rows))))
    return tuple(rows[i] for i in order[:cut]), tuple(rows[i] for i in order[cut:])


def fit_length_predictor(rows: Sequence[PromptSampleRow], classes: int = 4, seed: int = 0) -> PromptLengthPredictor:
    """A `PromptLengthPredictor` fitted on `rows`' prompts and output lengths."""
    return PromptLengthPredictor.fit([r.prompt_token_ids for r in rows], [r.output_tokens for r in rows],
                                     classes=classes, seed=seed)


@functools.lru_cache(maxsize=1)
def bundled_length_predictor() -> PromptLengthPredictor:
    """The predictor fitted on the whole bundled sample: "las-predicted"'s default, right for the
    default model (`SAMPLE_MODEL`); another model should fit its own on its measured lengths."""
    return fit_length_predictor(load_prompt_sample())


def prompt_workload(rows: Sequence[PromptSampleRow], n: int, rate_per_s: float, *, cv: float = 1.0,
                    seed: int = 0, family_weights: Mapping[str, float] | None = None) -> tuple[WorkloadItem, ...]:
    """`n` requests with Gamma arrivals (CV `cv`) whose prompts are resampled from `rows`; each
    item carries its prompt's token ids. `family_weights` weights the families (a family left out
    is never drawn; None: every row equally likely). Same seed, same prompts at every rate and CV."""
    if not rows:
        raise ValueError("need at least one row")
    weights = np.ones(len(rows))
    if family_weights is not None:
        unknown = set(family_weights) - {r.family for r in rows}
        if unknown or any(not math.isfinite(w) or w < 0 for w in family_weights.values()):
            raise ValueError("family weights must be finite, >= 0 and name families of the rows "
                             f"(unknown: {sorted(unknown)})")
        counts = Counter(row.family for row in rows)
        weights = np.array([family_weights.get(r.family, 0.0) / counts[r.family] for r in rows])
        if weights.sum() <= 0:
            raise ValueError("family weights leave no row to draw")
    arrival_seed, pick_seed = np.random.SeedSequence(seed).spawn(2)
    arrivals = gamma_arrivals(rate_per_s, cv, n, int(arrival_seed.generate_state(1)[0]))
    picks = np.random.default_rng(pick_seed).choice(len(rows), size=n, p=weights / weights.sum())
    return tuple(WorkloadItem(float(a), len(rows[i].prompt_token_ids), rows[i].output_tokens, rows[i].prompt_token_ids)
                 for a, i in zip(arrivals, picks))
