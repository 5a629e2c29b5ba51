"""An output-length predictor on the prompt: hashed token n-grams, ridge regression, length classes.

Later work on LLM scheduling (S3, Jin et al. 2023; learning-to-rank schedulers, Fu et al. 2024)
predicts each request's output length, or its rank, from the prompt and schedules shortest first.
This is the cheap end of that family, fitted in well under a second on a few hundred prompts:

- **Features**: the prompt's token ids as hashed unigrams and bigrams (presence, `dim` buckets)
  plus log prompt length. No tokenizer or model is needed here: the executor passes token ids.
- **Model**: ridge regression of log output length on the features (the dual form, `n` x `n`).
- **Classes**: the training rows' *out-of-fold* predictions (k-fold cross-fitting, so a class
  holds the lengths a prediction of that class really ends with, errors included) are cut at
  their quantiles into `classes` equally full classes. A prompt's class is where its prediction
  falls; the class's sample of true lengths is what a scheduler ranks it by (a per-class Gittins
  index in "las-predicted"). A useless predictor gives classes with one shared distribution, so
  the scheduler falls back to the size-blind order; a perfect one gives shortest-first.

Pure numpy; no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.stats import spearmanr

_UNIGRAM_MULT = 2654435761  # Knuth's multiplicative hash (stable across runs, unlike hash())
_BIGRAM_MULT = 1000003


class LengthClassifier(Protocol):
    """What "las-predicted" needs of a predictor: each class's sample of true output lengths, and
    the class of a prompt. `PromptLengthPredictor` is one; a benchmark's clairvoyant stand-in,
    told every length, is another (how much of the gap to the oracle is the predictor's)."""

    @property
    def class_lengths(self) -> tuple[tuple[int, ...], ...]:
        """Per class, the true output lengths its training prompts ended with (each non-empty)."""
        ...

    def classify(self, prompt_token_ids: Sequence[int]) -> int:
        """The length class of a prompt: 0 .. len(class_lengths) - 1."""
        ...


def prompt_features(token_ids: Sequence[int], dim: int) -> np.ndarray:
    """The feature vector of one prompt: `dim` hashed unigram/bigram presence bits, then
    log(1 + prompt length) and a constant 1."""
    row = np.zeros(dim + 2)
    ids = [int(t) for t in token_ids]
    for token in ids:
        row[(token * _UNIGRAM_MULT) % dim] = 1.0
    for first, second in zip(ids, ids[1:]):
        row[((first * _BIGRAM_MULT + second) * _UNIGRAM_MULT) % dim] = 1.0
    row[dim] = math.log1p(len(ids))
    row[dim + 1] = 1.0
    return row


def _ridge_dual(features: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """Weights minimising |Xw - y|^2 + ridge |w|^2, solved in the dual (n x n) form."""
    gram = features @ features.T + ridge * np.eye(len(features))
    return features.T @ np.linalg.solve(gram, targets)


@dataclass(frozen=True)
class PromptLengthPredictor:
    """A fitted predictor: `classify(prompt_token_ids)` -> a length class, 0 = shortest.

    Build it with `fit`. `class_lengths[c]` holds the true output lengths of the training prompts
    whose out-of-fold prediction fell in class `c`.
    """

    dim: int  #: hashed feature buckets
    weights: tuple[float, ...]  #: ridge weights over `prompt_features` (dim + 2 of them)
    edges: tuple[float, ...]  #: predicted log-length cut points between classes (classes - 1)
    class_lengths: tuple[tuple[int, ...], ...]  #: true lengths of the training rows in each class
    holdout_spearman: float  #: rank correlation of out-of-fold predictions with true lengths

    def __post_init__(self) -> None:
        if self.dim < 1 or len(self.weights) != self.dim + 2:
            raise ValueError("need dim >= 1 and dim + 2 weights")
        if len(self.class_lengths) != len(self.edges) + 1 or any(not c for c in self.class_lengths):
            raise ValueError("need one non-empty length sample per class (len(edges) + 1)")
        if list(self.edges) != sorted(self.edges):
            raise ValueError("edges must be increasing")
        if not all(math.isfinite(v) for v in (*self.weights, *self.edges)):
            raise ValueError("weights and edges must be finite")
        if any(not _whole(n) or n < 1 for lengths in self.class_lengths for n in lengths):
            raise ValueError("class lengths must be whole numbers >= 1 of tokens")

    @property
    def classes(self) -> int:
        """Number of length classes."""
        return len(self.class_lengths)

    def predict_log_length(self, prompt_token_ids: Sequence[int]) -> float:
        """Predicted log output length (natural log of tokens) of a prompt."""
        return float(prompt_features(prompt_token_ids, self.dim) @ np.asarray(self.weights))

    def predict_length(self, prompt_token_ids: Sequence[int]) -> float:
        """Predicted output length (tokens; the geometric-mean sense of the log-length fit)."""
        return math.exp(self.predict_log_length(prompt_token_ids))

    def classify(self, prompt_token_ids: Sequence[int]) -> int:
        """The length class of a prompt: 0 (predicted shortest) .. classes - 1."""
        return int(np.searchsorted(np.asarray(self.edges), self.predict_log_length(prompt_token_ids),
                                   side="right"))

    @classmethod
    def fit(cls, prompts: Sequence[Sequence[int]], lengths: Sequence[int], classes: int = 4,
            dim: int = 2048, ridge: float = 1.0, folds: int = 5, seed: int = 0) -> PromptLengthPredictor:
        """Fit on prompts (token ids) and their measured output lengths (tokens, each >= 1).

        Raises ValueError for mismatched or too few rows (at least `folds` and 2 per class),
        lengths < 1, an empty prompt, or settings out of range.
        """
        if len(prompts) != len(lengths):
            raise ValueError(f"{len(prompts)} prompts but {len(lengths)} lengths")
        if classes < 1 or folds < 2 or dim < 1 or not ridge > 0:
            raise ValueError("need classes >= 1, folds >= 2, dim >= 1 and ridge > 0")
        if len(prompts) < max(folds, 2 * classes):
            raise ValueError(f"need at least {max(folds, 2 * classes)} rows, got {len(prompts)}")
        if any(not _whole(n) or n < 1 for n in lengths) or any(len(p) == 0 for p in prompts):
            raise ValueError("every length must be a whole number >= 1 of tokens and every prompt non-empty")
        if any(not _whole(t) or t < 0 for p in prompts for t in p):
            raise ValueError("prompt token ids must be whole numbers >= 0")
        features = np.stack([prompt_features(p, dim) for p in prompts])
        targets = np.log(np.asarray(lengths, dtype=float))
        fold_of = np.random.default_rng(seed).permutation(len(prompts)) % folds
        held_out = np.empty(len(prompts))
        for fold in range(folds):
            test = fold_of == fold
            weights = _ridge_dual(features[~test], targets[~test], ridge)
            held_out[test] = features[test] @ weights
        weights = _ridge_dual(features, targets, ridge)
        edges = np.quantile(held_out, np.arange(1, classes) / classes) if classes > 1 else np.array([])
        labels = np.searchsorted(edges, held_out, side="right")
        by_class = tuple(tuple(int(n) for n, label in zip(lengths, labels) if label == c) for c in range(classes))
        if any(not c for c in by_class):  # ties left a class empty: fewer, fuller classes
            return cls.fit(prompts, lengths, classes - 1, dim, ridge, folds, seed)
        return cls(dim, tuple(float(w) for w in weights), tuple(float(e) for e in edges), by_class,
                   _rank_correlation(held_out, targets))


def _whole(value: object) -> bool:
    """Whether `value` is a whole number (an int, or a finite float without a fraction)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def _rank_correlation(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Spearman's rank correlation; 0 where either side is constant."""
    if np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return 0.0
    return float(spearmanr(predicted, actual).statistic)
