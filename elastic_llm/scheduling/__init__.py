"""Request schedulers (policy layer: pure, no torch, no dask, no clock; `now` is a parameter)."""

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    RequestScheduler,
    ScheduledWork,
    SchedulerOutput,
)
from elastic_llm.scheduling.fcfs import FCFS

__all__ = [
    "BatchLimits",
    "FCFS",
    "IterationOutcome",
    "RequestScheduler",
    "ScheduledWork",
    "SchedulerOutput",
]
