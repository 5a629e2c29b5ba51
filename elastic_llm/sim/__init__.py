"""Simulator (policy layer only): the live system's policy classes, with modelled execution time.

`simulate` replays a workload through one engine's scheduler; `simulate_fleet` replays spot
availability and arrival traces through the fleet's control state machine (`FleetSimulator`).
"""

from elastic_llm.sim.fleet import FleetSimulator, SimulationLimitError
from elastic_llm.sim.oracle import ShortestRemainingFirst
from elastic_llm.sim.results import SimResult, SimSettings
from elastic_llm.sim.scheduling import IterationTimeModel, SimulatedTiming, simulate
from elastic_llm.sim.setup import PaperSetting, simulate_fleet

__all__ = ["FleetSimulator", "IterationTimeModel", "PaperSetting", "ShortestRemainingFirst", "SimResult",
           "SimSettings", "SimulatedTiming", "SimulationLimitError", "simulate", "simulate_fleet"]
