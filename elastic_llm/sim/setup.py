"""One call from (policy, model, profile, traces) to a `SimResult`: SpotServe's setting as defaults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_llm.control import FleetConfig, FleetPolicy, FleetState
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.profiles import InstanceProfile
from elastic_llm.sim.fleet import FleetSimulator
from elastic_llm.sim.replica import IterationClock
from elastic_llm.sim.results import SimResult, SimSettings
from elastic_llm.sim.traces import Arrival, AvailabilityTrace


@dataclass(frozen=True)
class PaperSetting:
    """How SpotServe's artifact ran a model (its scripts; `../shared/data/spotserve/README.md`)."""

    required_rate: float = 0.4  #: required throughput the optimizer plans for (req/s)
    #: bytes one GPU may hold in the planner: chosen so that the smallest shape is the artifact's
    #: memory floor (GPT-20B: 12 GPUs; 8 GPUs would need 11.9 GB each, 12 need 8.5 GB)
    memory_budget_bytes: int = 95 * 10**8
    prompt_tokens: int = 512  #: input length
    output_tokens: int = 128  #: output length
    #: re-plan shapes on the measured arrival rate too (our live controller's load check); False:
    #: plan for `required_rate` only, as the artifact's optimizer does
    measured_rate: bool = False
    #: a fixed (P, M) for every replica; None: the planner chooses (SpotServe adapts it, the
    #: baselines keep their first choice)
    parallel: tuple[int, int] | None = None


def simulate_fleet(policy: str | FleetPolicy, spec: ModelSpec, profile: InstanceProfile,
                   availability: AvailabilityTrace, arrivals: Sequence[Arrival],
                   setting: PaperSetting = PaperSetting(), settings: SimSettings | None = None) -> SimResult:
    """Run one policy over the traces with the live `FleetState` and return the figures."""
    settings = settings or SimSettings(output_tokens=setting.output_tokens)
    config = FleetConfig(parallel=setting.parallel, max_batch_size=settings.max_batch,
                         memory_budget_bytes=setting.memory_budget_bytes, required_rate=setting.required_rate,
                         plan_workload=(setting.prompt_tokens, setting.output_tokens),
                         rate_window_s=60.0 if setting.measured_rate else 0.0,
                         max_events_per_client=0)  # no client reads events: none are logged
    fleet = FleetState(policy, config, profile=profile)
    clock = IterationClock(spec, profile, prompt_tokens=setting.prompt_tokens)
    return FleetSimulator(fleet, spec, clock, settings).run(availability, arrivals)
