"""Configuration optimizer: which (D, P, M, B, m1, m2) to run on the instances available now.

SpotServe's rule: among configurations whose throughput meets the arrival rate, the lowest
latency; if none does, the highest throughput. D is always ``devices // (P * M)`` (spare replicas
never hurt). Two additions beyond the paper's artifact:

* **Switch cost** (`SwitchCost`): moving to a different replica shape (P, M) pauses service for
  about ``seconds``; over a horizon of ``horizon_seconds`` a fraction ``f = seconds / horizon`` of
  requests meets that pause (waiting ``seconds / 2`` on average) and requests in flight are held
  up, so the candidate is scored with latency ``lat + f * (lat + seconds / 2)`` and throughput
  ``thr * (1 - f)``. Changing only D or B is free (no weights move between kept replicas).
* **Cost-aware on-demand** (`ConfigOptimizer.choose_fleet`): when spot instances cannot meet the
  rate, add the fewest on-demand instances that can; when spot suffices, none (so on-demand
  instances are the first released).

The search is exhaustive over the space with two exact prunings, checked against brute force in
the tests: (1) a P whose busiest stage has as many layers as with P - 1 stages is dominated (same
memory, longer pipeline, fewer replicas); (2) prefill and decode micro-batch counts are chosen
independently, since latency is prefill + S_out * decode step and both scores are monotone in it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from elastic_llm.planning.config import ParallelConfig
from elastic_llm.planning.cost_model import CostBreakdown, CostModel
from elastic_llm.planning.errors import NoFeasibleConfigError, PlanningError
from elastic_llm.planning.profiles import Phase


@dataclass(frozen=True)
class SearchSpace:
    """The configurations the optimizer may choose from."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  #: candidate B
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)  #: candidate m1 and m2 (those dividing B)
    tensor_degrees: tuple[int, ...] | None = None  #: candidate M; None = the profile's degrees
    pipeline_degrees: tuple[int, ...] | None = None  #: candidate P; None = 1..num_layers

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "micro_batches", "tensor_degrees", "pipeline_degrees"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise PlanningError(f"SearchSpace.{name} must hold positive ints")


def spotserve_pipeline_degrees(num_layers: int, pad_to: int = 8) -> tuple[int, ...]:
    """SpotServe's P candidates: divisors of the layer count padded up to a multiple of ``pad_to``
    (our reading of "P divides the padded layer count"; 44 layers -> divisors of 48), at most L."""
    padded = -(-num_layers // pad_to) * pad_to
    return tuple(p for p in range(1, num_layers + 1) if padded % p == 0)


@dataclass(frozen=True)
class SwitchCost:
    """What leaving the running configuration's shape costs (see module docstring)."""

    current: ParallelConfig  #: the configuration running now
    seconds: float  #: expected service pause of a migration to another (P, M)
    horizon_seconds: float  #: expected time until the next reconfiguration

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.horizon_seconds <= 0:
            raise PlanningError("SwitchCost needs seconds >= 0 and horizon_seconds > 0")

    def fraction(self, config: ParallelConfig) -> float:
        """Share of the horizon spent migrating if ``config`` is chosen (0 for the same shape)."""
        if config.shape == self.current.shape:
            return 0.0
        return min(1.0, self.seconds / self.horizon_seconds)


@dataclass(frozen=True)
class Choice:
    """The optimizer's decision."""

    config: ParallelConfig  #: configuration to run
    estimate: CostBreakdown  #: its cost-model breakdown
    meets_rate: bool  #: estimate.throughput >= the arrival rate
    score_latency: float  #: latency with the switch penalty (what was minimised)
    score_throughput: float  #: throughput with the switch penalty (what was maximised)
    instances: int  #: instances the choice uses (spot + on-demand)
    on_demand: int = 0  #: on-demand instances among them (cost-aware mode)
    hourly_cost: float = 0.0  #: dollars per hour of all instances held (cost-aware mode)


@dataclass(frozen=True)
class Market:
    """Prices and limits for the cost-aware mode."""

    spot_price: float  #: $/h of one spot instance (g4dn.12xlarge: 1.9046)
    on_demand_price: float  #: $/h of one on-demand instance (g4dn.12xlarge: 3.912)
    max_on_demand: int = 0  #: most on-demand instances the fleet may add

    def __post_init__(self) -> None:
        if self.spot_price < 0 or self.on_demand_price < 0 or self.max_on_demand < 0:
            raise PlanningError("Market prices and max_on_demand must be >= 0")


class ConfigOptimizer:
    """Chooses configurations with one `CostModel` (and so one model, profile and workload)."""

    def __init__(self, cost_model: CostModel, space: SearchSpace = SearchSpace()) -> None:
        """Bind the optimizer to a cost model and a search space."""
        self.cost_model = cost_model
        self.space = space
        layers = cost_model.model.num_layers
        pipelines = space.pipeline_degrees or tuple(range(1, layers + 1))
        self._pipelines = tuple(sorted({p for p in pipelines if p <= layers}))
        self._tensors = tuple(sorted(space.tensor_degrees or cost_model.profile.tensor_degrees()))

    def shapes(self, devices: int,
               keep: tuple[int, int] | None = None) -> Iterator[tuple[int, int, int]]:
        """(P, M, B) triples that fit memory and at least one replica into ``devices``.

        Pruning (1): for each (M, B), a P is skipped when a smaller fitting P already gives the
        same busiest-stage layer count ceil(L / P), unless (P, M) is ``keep`` (the running shape,
        which a switch cost favours).
        """
        layers = self.cost_model.model.num_layers
        for m in self._tensors:
            for b in self.space.batch_sizes:
                seen: set[int] = set()
                for p in self._pipelines:
                    per_stage = -(-layers // p)
                    if p * m > devices or (per_stage in seen and (p, m) != keep):
                        continue
                    if self.cost_model.fits(ParallelConfig(1, p, m, b)):
                        seen.add(per_stage)
                        yield p, m, b

    def _best_micro(self, p: int, m: int, b: int, phase: Phase) -> int:
        """Micro-batch count minimising the phase time (pruning (2)); ties to fewer."""
        options = [k for k in self.space.micro_batches if b % k == 0] or [1]
        def seconds(k: int) -> float:
            config = ParallelConfig(1, p, m, b, k if phase is Phase.PREFILL else 1,
                                    k if phase is Phase.DECODE else 1)
            return self.cost_model.phase(config, phase).total
        return min(options, key=lambda k: (seconds(k), k))

    def candidates(self, devices: int,
                   keep: tuple[int, int] | None = None) -> Iterator[CostBreakdown]:
        """The best-micro-batched estimate of every fitting (P, M, B) on ``devices`` devices
        (``keep``: a shape exempt from pruning, see `shapes`)."""
        for p, m, b in self.shapes(devices, keep):
            config = ParallelConfig(devices // (p * m), p, m, b,
                                    self._best_micro(p, m, b, Phase.PREFILL),
                                    self._best_micro(p, m, b, Phase.DECODE))
            yield self.cost_model.estimate(config)

    def choose(self, instances: int, arrival_rate: float,
               switch: SwitchCost | None = None) -> Choice:
        """Best configuration for ``instances`` instances and ``arrival_rate`` requests/s.

        Raises `NoFeasibleConfigError` when no configuration fits the instances' memory.
        """
        devices = instances * self.cost_model.profile.devices_per_instance
        best: tuple[tuple[float, ...], Choice] | None = None
        for estimate in self.candidates(devices, switch.current.shape if switch else None):
            choice = _score(estimate, arrival_rate, switch, instances)
            # meeting the rate first; then lower latency; else higher throughput; then fewer devices
            if choice.meets_rate:
                key = (0.0, choice.score_latency, -choice.score_throughput)
            else:
                key = (1.0, -choice.score_throughput, choice.score_latency)
            key += (float(estimate.config.num_positions), *map(float, _config_tuple(estimate.config)))
            if best is None or key < best[0]:
                best = (key, choice)
        if best is None:
            raise NoFeasibleConfigError(
                f"{self.cost_model.model.name} fits no configuration on {instances} x "
                f"{self.cost_model.profile.name}"
            )
        return best[1]

    def choose_fleet(self, spot_instances: int, arrival_rate: float, market: Market,
                     switch: SwitchCost | None = None) -> Choice:
        """Cost-aware choice: the fewest on-demand instances (0..market.max_on_demand) with which
        the rate is met, or, if none suffices, the fewest reaching the highest throughput.

        Throughput of the best choice never falls as instances are added (the candidate set only
        grows), so both minima are found by bisection.
        """
        counts = range(market.max_on_demand + 1)
        cache: dict[int, Choice | None] = {}

        def at(extra: int) -> Choice | None:
            if extra not in cache:
                try:
                    cache[extra] = self.choose(spot_instances + extra, arrival_rate, switch)
                except NoFeasibleConfigError:
                    cache[extra] = None
            return cache[extra]

        def meets(extra: int) -> bool:
            found = at(extra)
            return found is not None and found.meets_rate

        extra = bisect.bisect_left(counts, True, key=meets)
        if extra > market.max_on_demand:
            top = at(market.max_on_demand)
            if top is None:
                raise NoFeasibleConfigError(
                    f"{self.cost_model.model.name} fits no configuration even with "
                    f"{market.max_on_demand} on-demand instances"
                )
            extra = bisect.bisect_left(
                counts, True,
                key=lambda n: (c := at(n)) is not None and c.score_throughput >= top.score_throughput)
        chosen = at(extra)
        assert chosen is not None
        cost = spot_instances * market.spot_price + extra * market.on_demand_price
        return Choice(chosen.config, chosen.estimate, chosen.meets_rate, chosen.score_latency,
                      chosen.score_throughput, spot_instances + extra, extra, cost)


def _config_tuple(config: ParallelConfig) -> tuple[int, ...]:
    return (config.P, config.M, config.B, config.prefill_micro_batches, config.decode_micro_batches)


def _score(estimate: CostBreakdown, rate: float, switch: SwitchCost | None,
           instances: int) -> Choice:
    """Wrap an estimate as a `Choice`, applying the switch penalty to its scores."""
    fraction = switch.fraction(estimate.config) if switch else 0.0
    latency = estimate.latency
    if fraction:
        assert switch is not None
        latency += fraction * (estimate.latency + switch.seconds / 2)
    return Choice(
        config=estimate.config,
        estimate=estimate,
        meets_rate=estimate.throughput >= rate,
        score_latency=latency,
        score_throughput=estimate.throughput * (1.0 - fraction),
        instances=instances,
    )
