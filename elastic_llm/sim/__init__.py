"""Simulator (policy layer only): the live system's policy classes, with modelled execution time."""

from elastic_llm.sim.oracle import ShortestRemainingFirst
from elastic_llm.sim.scheduling import IterationTimeModel, SimulatedTiming, simulate

__all__ = ["IterationTimeModel", "ShortestRemainingFirst", "SimulatedTiming", "simulate"]
