"""Request schedulers (policy layer: pure, no torch, no dask, no clock; `now` is a parameter)."""

from elastic_llm.scheduling.base import (
    BatchLimits,
    IterationOutcome,
    RequestScheduler,
    ScheduledWork,
    SchedulerOutput,
)
from elastic_llm.scheduling.factory import (
    DEFAULT_PREFILL_PREDICTOR,
    SCHEDULER_NAMES,
    SchedulerName,
    check_scheduler_name,
    make_scheduler,
    scheduler_name,
)
from elastic_llm.scheduling.fcfs import FCFS
from elastic_llm.scheduling.gittins import GittinsTable
from elastic_llm.scheduling.las import GuardedLAS, LASConfig, LASEntryState
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig
from elastic_llm.scheduling.las_predicted import PredictedLAS, PredictedLASConfig
from elastic_llm.scheduling.length_predictor import LengthClassifier, PromptLengthPredictor
from elastic_llm.scheduling.mlfq import MLFQConfig, QueueEntryState, SkipJoinMLFQ
from elastic_llm.scheduling.predictor import LinearPrefillPredictor, PrefillPredictor
from elastic_llm.scheduling.residency import (
    KVResidencyPolicy,
    ResidencyConfig,
    ResidencyDecision,
    attach_residency,
    check_residency_scheduler,
    plan_iteration,
)
from elastic_llm.scheduling.workloads import WorkloadItem, make_workload

__all__ = [
    "AdaptiveLAS",
    "AdaptiveLASConfig",
    "DEFAULT_PREFILL_PREDICTOR",
    "SCHEDULER_NAMES",
    "BatchLimits",
    "FCFS",
    "GittinsTable",
    "GuardedLAS",
    "LASConfig",
    "LASEntryState",
    "LengthClassifier",
    "IterationOutcome",
    "KVResidencyPolicy",
    "LinearPrefillPredictor",
    "MLFQConfig",
    "PredictedLAS",
    "PredictedLASConfig",
    "PrefillPredictor",
    "PromptLengthPredictor",
    "QueueEntryState",
    "RequestScheduler",
    "ResidencyConfig",
    "ResidencyDecision",
    "ScheduledWork",
    "SchedulerName",
    "SchedulerOutput",
    "SkipJoinMLFQ",
    "WorkloadItem",
    "attach_residency",
    "check_residency_scheduler",
    "check_scheduler_name",
    "make_scheduler",
    "make_workload",
    "plan_iteration",
    "scheduler_name",
]
