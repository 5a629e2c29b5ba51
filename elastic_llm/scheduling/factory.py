"""Request schedulers by name: the one place that turns "fcfs" / "mlfq" / "skip-join" into a policy.

The cluster's `ReplicaOptions`, the benchmarks and anything else that takes a scheduler by name
build it here, so a name means the same policy everywhere:

- "fcfs": `FCFS`, run to completion in arrival order (never preempts);
- "mlfq": `SkipJoinMLFQ` with `skip_join=False`, every request joins level 0;
- "skip-join": `SkipJoinMLFQ` with `skip_join=True` (FastServe), a request joins the level whose
  quantum covers its predicted prefill time;
- "las-guard": `GuardedLAS`, least attained service counted in sampled tokens, FIFO within a
  level, hysteresis against bursts, and an age guard (a multiple of the online mean completion
  time) that serves old requests first: the policy that wins on bursty heavy-tailed load
  (docs/benchmarks.md, issue 20);
- "las-adaptive": `AdaptiveLAS`, las-guard with first tokens in extra batch slots (no running
  request displaced) and a guard whose slack follows the measured length tail and arrival
  burstiness (docs/benchmarks.md, issue 20, second pass);
- "las-predicted": `PredictedLAS`, las-adaptive ranked per request by the Gittins index of the
  output-length class a predictor gives its prompt (`length_predictor=`; default: the predictor
  fitted on the bundled prompt sample of the default model, `prompt_sample.bundled_length_predictor`:
  the first such call reads that package data file and fits, about a second, then it is cached).

Only the MLFQ names can drive a KV residency policy (they estimate next scheduled times).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, cast, get_args

from elastic_llm.scheduling.base import RequestScheduler
from elastic_llm.scheduling.fcfs import FCFS
from elastic_llm.scheduling.las import GuardedLAS, LASConfig, widen_config
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig
from elastic_llm.scheduling.las_predicted import PredictedLAS, PredictedLASConfig
from elastic_llm.scheduling.length_predictor import PromptLengthPredictor
from elastic_llm.scheduling.mlfq import MLFQConfig, SkipJoinMLFQ
from elastic_llm.scheduling.predictor import LinearPrefillPredictor, PrefillPredictor

SchedulerName = Literal["fcfs", "mlfq", "skip-join", "las-guard", "las-adaptive", "las-predicted"]
_LAS_NAMES = ("las-guard", "las-adaptive", "las-predicted")

#: Every scheduler name `make_scheduler` accepts.
SCHEDULER_NAMES: tuple[SchedulerName, ...] = get_args(SchedulerName)

#: Skip-join's prefill predictor when none is given: 74 ms + 2.88 ms per prompt token, measured for
#: SmolLM2-135M (fp32, one thread) on the project's 2-core CPU (docs/benchmarks.md, issue 5).
#: Another model or machine should pass its own (`LinearPrefillPredictor.fit` on measured prefills).
DEFAULT_PREFILL_PREDICTOR = LinearPrefillPredictor(intercept_s=0.074, per_token_s=0.00288)


def check_scheduler_name(name: str) -> SchedulerName:
    """`name` if it is a known scheduler name; ValueError naming the choices otherwise."""
    if name not in SCHEDULER_NAMES:
        choices = ", ".join(repr(n) for n in SCHEDULER_NAMES)
        raise ValueError(f"unknown scheduler {name!r}: choose one of {choices}")
    return cast(SchedulerName, name)


def make_scheduler(name: str, mlfq: MLFQConfig | None = None,
                   predict_prefill_s: PrefillPredictor | None = None,
                   las: LASConfig | None = None,
                   length_predictor: PromptLengthPredictor | None = None) -> RequestScheduler:
    """A fresh scheduler of policy `name` (one of `SCHEDULER_NAMES`).

    `mlfq`: MLFQ settings for "mlfq" and "skip-join" (None: `MLFQConfig()`); its `skip_join`
    flag is set by the name. `predict_prefill_s`: skip-join's prefill-time predictor (None:
    `DEFAULT_PREFILL_PREDICTOR`). Raises ValueError for an unknown name or a setting the named
    policy would ignore (MLFQ settings for "fcfs", a predictor for anything but "skip-join").
    `las`: settings of "las-guard" (None: `LASConfig()`), "las-adaptive" (None:
    `AdaptiveLASConfig()`) or "las-predicted" (None: `PredictedLASConfig()`); a plain `LASConfig`
    keeps its fields and takes the named policy's defaults for the rest. Refused by every other
    name; "las-guard" refuses an `AdaptiveLASConfig`.
    `length_predictor`: "las-predicted"'s output-length predictor (None: the bundled one), refused
    by every other name.
    """
    name = check_scheduler_name(name)
    if las is not None and name not in _LAS_NAMES:
        raise ValueError(f"scheduler {name!r} takes no LAS settings (only {', '.join(map(repr, _LAS_NAMES))} do)")
    if length_predictor is not None and name != "las-predicted":
        raise ValueError(f"scheduler {name!r} takes no length predictor (only 'las-predicted' does)")
    if name in _LAS_NAMES:
        if mlfq is not None or predict_prefill_s is not None:
            raise ValueError(f"scheduler {name!r} takes no MLFQ settings or prefill predictor")
        if name == "las-guard":
            if isinstance(las, AdaptiveLASConfig):
                raise ValueError("scheduler 'las-guard' ignores the adaptive settings: use 'las-adaptive'")
            return GuardedLAS(las)
        if las is not None:  # a plain LASConfig takes the named policy's own defaults for the rest
            las = widen_config(las, AdaptiveLASConfig if name == "las-adaptive" else PredictedLASConfig)
        if name == "las-adaptive":
            return AdaptiveLAS(las)
        if length_predictor is None:
            from elastic_llm.scheduling.prompt_sample import bundled_length_predictor

            length_predictor = bundled_length_predictor()
        return PredictedLAS(length_predictor, las)
    if name == "fcfs":
        if mlfq is not None:
            raise ValueError("scheduler 'fcfs' takes no MLFQ settings (mlfq=...)")
        if predict_prefill_s is not None:
            raise ValueError("scheduler 'fcfs' takes no prefill predictor (only 'skip-join' does)")
        return FCFS()
    skip_join = name == "skip-join"
    if predict_prefill_s is not None and not skip_join:
        raise ValueError(f"scheduler {name!r} takes no prefill predictor (only 'skip-join' does)")
    config = dataclasses.replace(mlfq or MLFQConfig(), skip_join=skip_join)
    if not skip_join:
        return SkipJoinMLFQ(config)
    return SkipJoinMLFQ(config, predict_prefill_s or DEFAULT_PREFILL_PREDICTOR)


def scheduler_name(scheduler: RequestScheduler) -> str:
    """The name of the policy `scheduler` runs (inverse of `make_scheduler`): one of
    `SCHEDULER_NAMES`, or the class name of a scheduler built some other way."""
    if isinstance(scheduler, SkipJoinMLFQ):
        return "skip-join" if scheduler.config.skip_join else "mlfq"
    if isinstance(scheduler, FCFS):
        return "fcfs"
    if isinstance(scheduler, PredictedLAS):
        return "las-predicted"
    if isinstance(scheduler, AdaptiveLAS):
        return "las-adaptive"
    if isinstance(scheduler, GuardedLAS):
        return "las-guard"
    return type(scheduler).__name__
