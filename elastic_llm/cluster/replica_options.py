"""`ReplicaOptions`: how each replica's engine is built (a frozen dataclass, pickled to workers).

Validated on construction, so that a bad setting or a bad combination (a KV residency budget
under FCFS, or on a sharded replica) fails where the options are made rather than on a worker.
The scheduler comes from the policy layer's one name -> scheduler factory
(`elastic_llm.scheduling.make_scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.scheduling import (
    SCHEDULER_NAMES,
    BatchLimits,
    LinearPrefillPredictor,
    LASConfig,
    MLFQConfig,
    PromptLengthPredictor,
    RequestScheduler,
    ResidencyConfig,
    SchedulerName,
    check_residency_scheduler,
    make_scheduler,
)


@dataclass(frozen=True)
class ReplicaOptions:
    """How a replica's engine is built; validated on construction (so a bad setting fails where
    it is made, not on a worker)."""

    model: str  #: embedded model name or checkpoint directory
    max_batch_size: int = 16  #: requests per iteration
    max_batch_tokens: int = 1024  #: tokens per iteration
    #: request policy, one of `SCHEDULER_NAMES` ("fcfs", "mlfq", "skip-join", "las-guard",
    #: "las-adaptive", "las-predicted"), built by
    #: `elastic_llm.scheduling.make_scheduler`
    scheduler: SchedulerName = "fcfs"
    threads: int = 1  #: torch threads in this worker process
    min_step_seconds: float = 0.0  #: pace iterations to at least this long (emulates a slower instance)
    #: bytes/s at which weights come from the checkpoint store (None: as fast as local disk);
    #: a real fleet reads object storage, so a fair baseline pays that on every reload
    checkpoint_bandwidth: float | None = None
    #: (P, M) of each replica: above (1, 1) the replica's engine drives a `DaskShardedExecutor`
    #: over `ShardActor`s on P*M workers (the first, the leader, also holds the `ReplicaActor`);
    #: "auto": the controller's planning core chooses (P, M) for the workers at hand (and
    #: re-chooses it when they change)
    parallel: tuple[int, int] | str = (1, 1)
    shard_timeout_s: float = 60.0  #: limit on every shard answer and collective (sharded only)
    #: bytes of weights + KV one worker may hold (None: the workers' own announced budget); with
    #: parallel="auto" a model that does not fit one worker is sharded over several
    memory_budget_bytes: int | None = None
    #: MLFQ settings of "mlfq" / "skip-join" (None: `MLFQConfig()`; `skip_join` follows the name)
    mlfq: MLFQConfig | None = None
    #: skip-join's prefill-time predictor (None: `scheduling.DEFAULT_PREFILL_PREDICTOR`)
    prefill_predictor: LinearPrefillPredictor | None = None
    #: settings of "las-guard" (None: `LASConfig()`), "las-adaptive" or "las-predicted" (an
    #: `AdaptiveLASConfig`; None: its defaults); refused with any other scheduler
    las: LASConfig | None = None
    #: "las-predicted"'s output-length predictor (None: the one fitted on the bundled prompt sample
    #: of the default model); refused with any other scheduler
    length_predictor: PromptLengthPredictor | None = None
    #: device KV budget with proactive swap to host or drop-and-recompute (FastServe); needs an
    #: MLFQ scheduler and a whole-model replica. None: every request's KV stays on the device
    kv_residency: ResidencyConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parallel, str):
            if self.parallel != "auto":
                raise ValueError(f'parallel must be (P, M) or "auto", not {self.parallel!r}')
        elif len(self.parallel) != 2 or min(self.parallel) < 1:
            raise ValueError(f"parallel must be (P, M) with P, M >= 1, not {self.parallel!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be > 0")
        try:
            BatchLimits(self.max_batch_size, self.max_batch_tokens)
            scheduler = self.build_scheduler()
        except ValueError as exc:
            raise ClusterConfigError(f"ReplicaOptions: {exc}") from None
        if self.kv_residency is not None:
            self._check_residency(self.kv_residency, scheduler)

    def _check_residency(self, residency: ResidencyConfig, scheduler: RequestScheduler) -> None:
        """Combinations of `kv_residency` with the other options that the engine would refuse."""
        if self.sharded:
            raise ClusterConfigError(
                "ReplicaOptions.kv_residency needs a whole-model replica (parallel=(1, 1)): a sharded "
                f"replica's executor neither swaps KV nor tracks where it is (parallel={self.parallel!r})")
        if residency.device_budget_bytes <= 0:
            raise ClusterConfigError("ReplicaOptions.kv_residency.device_budget_bytes must be > 0")
        if self.memory_budget_bytes is not None and residency.device_budget_bytes > self.memory_budget_bytes:
            raise ClusterConfigError(
                f"ReplicaOptions.kv_residency.device_budget_bytes ({residency.device_budget_bytes}) "
                f"exceeds memory_budget_bytes ({self.memory_budget_bytes}), which also holds the weights")
        try:
            check_residency_scheduler(scheduler, residency)
        except ValueError as exc:
            able = [n for n in SCHEDULER_NAMES if hasattr(make_scheduler(n), "estimate_next_scheduled")]
            raise ClusterConfigError(
                f"ReplicaOptions.kv_residency with scheduler={self.scheduler!r}: {exc}; "
                f"choose scheduler from {able}") from None

    def build_scheduler(self) -> RequestScheduler:
        """A fresh scheduler of these options (each engine gets its own)."""
        return make_scheduler(self.scheduler, self.mlfq, self.prefill_predictor, self.las, self.length_predictor)

    @property
    def auto_parallel(self) -> bool:
        """Whether the controller chooses each replica's (P, M)."""
        return self.parallel == "auto"

    @property
    def sharded(self) -> bool:
        """Whether replicas run as P x M shards on several workers."""
        return self.auto_parallel or tuple(self.parallel) != (1, 1)
