"""What a fleet simulation reports: `SimSettings` in, `SimResult` out (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic_llm.scheduling.factory import check_scheduler_name
from elastic_llm.sim.replica import Batching

#: g4dn.12xlarge, USD per hour (SpotServe's evaluation).
SPOT_PRICE = 1.9046
ON_DEMAND_PRICE = 3.912


@dataclass(frozen=True)
class SimSettings:
    """How the simulated fleet behaves (defaults: SpotServe's setup on g4dn.12xlarge)."""

    grace_period_s: float = 30.0  #: a removal's notice comes this long before it (GCP/Azure: 30 s)
    start_delay_s: float = 0.0  #: an acquired instance is usable this long after its trace time
    #: an instance the state machine asks for (`AcquireCapacity`) is usable this long after the
    #: request (90 s: SpotServe's +O traces bring each on-demand replacement 90 s after a preemption)
    acquire_delay_s: float = 90.0
    gpus_per_instance: int = 4  #: workers per instance (one per GPU)
    gpu_memory_bytes: int = 16 * 10**9  #: bytes of weights + KV one GPU holds
    storage_bandwidth: float = 1.25e9  #: bytes/s one instance reads the checkpoint at (object storage)
    link_bandwidth: float = 50e9 / 8  #: bytes/s between two instances (50 Gbps)
    engine_build_s: float = 1.0  #: building an engine whose weights are in place
    restart_delay_s: float = 10.0  #: a fenced worker's restart until it rejoins
    max_batch: int = 4  #: B
    batching: Batching = "static"  #: static (SpotServe's artifact) or continuous batching
    output_tokens: int = 128  #: output tokens per request
    #: a request scheduler by name (`elastic_llm.scheduling.factory`: "fcfs", "mlfq", "skip-join",
    #: "las-guard") picks each iteration's batch, token-level preemptive; None: `batching` decides
    scheduler: str | None = None
    spot_price: float = SPOT_PRICE  #: USD/h of one spot instance
    on_demand_price: float = ON_DEMAND_PRICE  #: USD/h of one on-demand instance
    warm_start: bool = True  #: replicas on the instances present at time 0 start loaded
    drain_limit_s: float = 3600.0  #: after the trace ends, stop at most this much later
    #: CPU cores all workers share (one machine, as the live replay on this machine): an iteration
    #: takes longer by (replicas iterating / cores) when that exceeds 1; None: every worker has its
    #: own device (a real fleet)
    shared_cores: int | None = None
    max_events: int = 50_000_000  #: bound on simulated events (a runaway is an error, not a hang)

    def __post_init__(self) -> None:
        for name in ("grace_period_s", "start_delay_s", "acquire_delay_s", "storage_bandwidth", "link_bandwidth",
                     "engine_build_s",
                     "restart_delay_s", "spot_price", "on_demand_price", "drain_limit_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"SimSettings.{name} must be a number >= 0, got {value!r}")
        if self.storage_bandwidth <= 0 or self.link_bandwidth <= 0:
            raise ValueError("SimSettings bandwidths must be > 0")
        if self.gpus_per_instance < 1 or self.max_batch < 1 or self.output_tokens < 1 or self.max_events < 1:
            raise ValueError("SimSettings.gpus_per_instance, max_batch, output_tokens, max_events must be >= 1")
        if self.shared_cores is not None and self.shared_cores < 1:
            raise ValueError("SimSettings.shared_cores must be >= 1 or None")
        if self.scheduler is not None:
            check_scheduler_name(self.scheduler)
            if self.scheduler == "las-predicted":  # the fleet's requests carry no prompts to predict from
                raise ValueError("SimSettings.scheduler 'las-predicted' needs prompts; the fleet simulator's "
                                 "requests have none (use elastic_llm.sim.simulate with a prompt workload)")
        if self.batching not in ("static", "continuous"):
            raise ValueError(f"SimSettings.batching must be 'static' or 'continuous', got {self.batching!r}")


@dataclass(frozen=True)
class SimResult:
    """The figures of one simulated run (the live controller's `status()` ones, plus cost)."""

    policy: str  #: the fleet policy
    requests: int  #: requests submitted
    finished: int  #: requests finished
    latency_mean_s: float  #: mean request latency (arrival to last token)
    latency_p50_s: float  #: median
    latency_p99_s: float  #: 99th percentile
    requests_restarted: int  #: requests that started over at least once
    tokens_recomputed: int  #: committed tokens computed again after a loss
    kv_bytes_migrated: int  #: KV bytes moved between replicas
    weight_bytes_moved: int  #: weight bytes sent between instances (peers, reshards)
    checkpoint_bytes: int  #: weight bytes read from object storage
    spot_instance_s: float  #: spot instance-seconds held
    on_demand_instance_s: float  #: on-demand instance-seconds held
    cost_usd: float  #: what the instances cost
    on_demand_cost_usd: float  #: the same instance-seconds at the on-demand price
    cost_per_token: float  #: SpotServe's formula: cost x 1e5 / (requests x 640), 1e-5 USD per token
    simulated_s: float  #: simulated seconds until the last request finished (or the drain limit)
    events: int  #: events processed
    instances_acquired: int = 0  #: instances brought in on the state machine's request
    instances_released: int = 0  #: instances given back on its request
    violations: tuple[str, ...] = ()  #: broken invariants seen (empty when all held)
    status: dict[str, Any] = field(default_factory=dict, compare=False)  #: the fleet's `status()`

    def row(self) -> dict[str, Any]:
        """The scalar figures as a flat dict (for printing)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("status", "violations")}
