""""las-predicted": las-adaptive ranked by a per-request output-length prediction from the prompt.

las-adaptive is size-blind: every request is ranked by one Gittins index of one sample of output
lengths, so a request that will write one word and one that will write an essay look alike
until the essay has run long. Where prompts carry information about their answers (a question
that asks for one word, one that asks for an essay), a predictor can tell them apart on arrival.
`PredictedLAS` takes a fitted `PromptLengthPredictor` (any `LengthClassifier`); each request's
prompt (`note_prompt`, called by the engine and the simulator before `add_request`) picks its
length class, and the request is ranked by the Gittins index of *that class's* sample of true
lengths at its attained service (the level's start, so FIFO within a level holds as before). A
class of short answers has a high index from the first token; a class of essays has a low one
until its members near their end; a mispredicted request that runs past its class's lengths sees
its index follow the class's tail; past its class's longest training length it is ranked by the
shared index. A request without a prompt note (an executor that never calls `note_prompt`) is
ranked by the shared index, as in las-adaptive. A resumed request starts again from no attained service (as in
every LAS policy here), so a mispredicted one may go through the express lane again.

**The express lane.** Measured in the simulator, ranking alone gains little where queues are long:
there the guard (which keeps the P99 within bounds) serves most requests oldest first, as FCFS
does. But a request predicted short costs the others little when it goes first, and most of the
mean is made of such requests in a mix of one-word answers and essays. So a started request of an
*express* class (its class's mean length at most `express_mean_fraction` of the whole sample's)
goes ahead of the guarded ones (behind newcomers' first tokens), as a first token does in
las-guard, until it has sampled its class's `express_quantile` length (a mispredicted long
request leaves the lane). The oldest guarded requests keep their half of the batch, so the
starvation bound stands; a guarded express request keeps its place in the lane too (the guard
only ever promotes). `express_batch_share` caps the lane's share of the batch, trading mean JCT
for P99.

Everything else is las-adaptive's: first tokens in extra slots, hysteresis, and the guard with its
starvation bound (the guard does not look at the prediction, so a mispredicted long request is
still served within `max_guard_s` plus its own run time). One of las-adaptive's settings is on
by default here: the first-token guard (`first_token_guard_iterations` = 10), which gives a
newcomer that has waited 10 mean iterations for its first token an extra slot of its own.

Pure: no clock (`now` is a parameter), no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from elastic_llm.scheduling.base import BatchLimits
from elastic_llm.scheduling.gittins import GittinsTable
from elastic_llm.scheduling.las import widen_config
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig
from elastic_llm.scheduling.length_predictor import LengthClassifier

if TYPE_CHECKING:
    from elastic_llm.scheduling.las import _Entry


@dataclass(frozen=True)
class PredictedLASConfig(AdaptiveLASConfig):
    """Settings of `PredictedLAS`: las-adaptive's plus the express lane's, with the first-token
    guard on (prompts long beside their answers: docs/benchmarks.md, issue 20, fifth pass)."""

    first_token_guard_iterations: float = 10.0  #: las-adaptive's setting, on here

    #: a class whose mean length is at most this share of the whole sample's mean is an express
    #: class (its started requests go ahead of guarded ones); 0: no express lane
    express_mean_fraction: float = 0.6
    #: an express request leaves the lane once it has sampled this quantile of its class's lengths
    express_quantile: float = 0.9
    #: the lane holds at most this share of `max_batch_size` (rounded down, at least one request;
    #: the best-ranked first); 1: as many as qualify. Lower trades mean JCT for P99
    express_batch_share: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.express_mean_fraction < 0 or not 0 < self.express_quantile <= 1:
            raise ValueError("need express_mean_fraction >= 0 and 0 < express_quantile <= 1")
        if not 0 < self.express_batch_share <= 1:
            raise ValueError("express_batch_share must be in (0, 1]")

    def lane_size(self, max_batch_size: int) -> int:
        """Most requests in the express lane in an iteration of `max_batch_size`."""
        return max(1, math.floor(self.express_batch_share * max_batch_size + 1e-9))


class PredictedLAS(AdaptiveLAS):
    """las-adaptive whose Gittins order is per predicted output-length class, with an express
    lane for the classes predicted short."""

    config: PredictedLASConfig

    def __init__(self, predictor: LengthClassifier, config: AdaptiveLASConfig | None = None) -> None:
        """`config`: a `PredictedLASConfig` (a plain `AdaptiveLASConfig` keeps its own fields,
        `first_token_guard_iterations` included, and takes the express lane's defaults); without `prior_lengths` the shared index (for requests without a class, and
        the guard's length quantile) starts from the predictor's training lengths."""
        self.predictor = predictor
        self._class_tables = tuple(GittinsTable.fit(lengths) for lengths in predictor.class_lengths)
        self._class_longest = tuple(max(lengths) for lengths in predictor.class_lengths)
        self._notes: dict[str, int] = {}  # {request_id: class} noted and not yet added
        self._lane: frozenset[str] = frozenset()  # express requests admitted in this iteration
        config = widen_config(config or PredictedLASConfig(), PredictedLASConfig)
        #: {express class: attained tokens at which its requests leave the lane}
        self.express_until = express_classes(predictor, config.express_mean_fraction, config.express_quantile)
        if not config.prior_lengths:
            config = replace(config, prior_lengths=tuple(n for lengths in predictor.class_lengths for n in lengths))
        super().__init__(config)

    def note_prompt(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        """Predict the class of the request about to be added (an empty prompt: no class)."""
        if prompt_token_ids:
            self._notes[request_id] = self.predictor.classify(prompt_token_ids)
        else:
            self._notes.pop(request_id, None)

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        """las-adaptive's, with the class its prompt note predicted (None without one)."""
        length_class = self._notes.pop(request_id, None)
        super().add_request(request_id, num_tokens_to_compute, now)
        self._entries[request_id].length_class = length_class

    def remove_request(self, request_id: str) -> None:
        """las-adaptive's; a prompt noted for a request that never got added is forgotten too."""
        self._notes.pop(request_id, None)
        super().remove_request(request_id)

    def length_class(self, request_id: str) -> int | None:
        """The predicted class of a held request (None: no prompt was noted); KeyError if unknown."""
        return self._entries[request_id].length_class

    def _rank(self, entry: _Entry) -> float:
        """Minus the class's Gittins index at the level's start; the shared rank without a class,
        without a shared index (so sorting and hysteresis agree), or past the class's longest
        training length (a mispredicted request: its class says nothing more about it)."""
        start = self.config.level_start(self.config.level(entry.attained))
        if entry.length_class is None or self._table is None or start >= self._class_longest[entry.length_class]:
            return super()._rank(entry)
        return -self._class_tables[entry.length_class](start)

    def _choose(self, limits: BatchLimits) -> list[str]:
        """las-adaptive's choice, with the express lane filled first (best-ranked, then oldest, up
        to `config.lane_size(max_batch_size)`); the guard marks of this iteration are set."""
        eligible = sorted((rid for rid, entry in self._entries.items() if self._qualifies(entry)),
                          key=lambda rid: (self._rank(self._entries[rid]), self._entries[rid].arrival,
                                           self._entries[rid].seq))
        self._lane = frozenset(eligible[: self.config.lane_size(limits.max_batch_size)])
        return super()._choose(limits)

    def _qualifies(self, entry: _Entry) -> bool:
        """A started request of an express class short of its class's exit length. A guarded one
        stays eligible: the guard promotes a request, it never sends one from the lane to the back
        of the guarded queue (where a 4-token answer waited behind long ones, measured)."""
        until = self.express_until.get(entry.length_class) if entry.length_class is not None else None
        return until is not None and 0 < entry.attained < until

    def _express(self, request_id: str) -> bool:
        entry = self._entries[request_id]
        return request_id in self._lane and self._qualifies(entry)

    def _early(self, request_id: str) -> bool:
        return super()._early(request_id) or self._express(request_id)

    def _key(self, request_id: str) -> tuple[int, float, float, int]:
        entry = self._entries[request_id]
        if self._express(request_id):  # ahead of the guarded, behind first tokens (0.0); by rank within
            return (-2, 2.0 + self._rank(entry), entry.arrival, entry.seq)  # (ranks lie in [-1, 0])
        return super()._key(request_id)


def express_classes(predictor: LengthClassifier, mean_fraction: float, quantile: float) -> dict[int, int]:
    """{class: exit length} of the classes whose mean length is at most `mean_fraction` of the
    whole training sample's; a request leaves the lane at its class's `quantile` length."""
    everything = [n for lengths in predictor.class_lengths for n in lengths]
    overall = float(np.mean(everything))
    return {c: max(1, int(np.quantile(lengths, quantile)))
            for c, lengths in enumerate(predictor.class_lengths)
            if float(np.mean(lengths)) <= mean_fraction * overall}
