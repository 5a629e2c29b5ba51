"""`FleetConfig`: the settings of the fleet's control state machine (frozen, validated)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FleetConfig:
    """How the fleet is run; the policy (`elastic_llm.control.policies`) is given separately."""

    #: (P, M) of every replica, or None: the planning core chooses (parallel="auto")
    parallel: tuple[int, int] | None = (1, 1)
    max_batch_size: int = 16  #: the replicas' batch size B (for the shape planner)
    memory_budget_bytes: int | None = None  #: bytes one worker may hold (None: the workers' own)
    migration_margin_s: float = 2.0  #: fixed part of a migration's time estimate (s)
    kv_bandwidth: float = 2e8  #: bytes/s at which KV moves between workers
    prefill_seconds_per_token: float = 2e-3  #: recompute cost per cached token (arrangement)
    start_timeout_s: float = 600.0  #: a replica start or reload not ready by then has failed
    call_timeout_s: float = 60.0  #: limit on a request hand-over to a replica
    transfer_slack_s: float = 30.0  #: a migration may run this long past the notice deadline
    reshard_timeout_s: float = 300.0  #: limit on one reshard
    #: limit on stopping a replica in order (a shard stuck in a collective with a dead peer
    #: waits out its own timeout first): its workers are held until then
    stop_timeout_s: float = 150.0
    rate_window_s: float = 60.0  #: window of the arrival rate handed to the shape planner
    load_check_s: float = 5.0  #: period of the arrival-rate check (adaptive shapes only)
    default_step_seconds: float = 0.05  #: iteration time assumed before a replica reported one
    client_log_ttl_s: float = 300.0  #: a disconnected client's event log is kept this long
    #: a ready replica with requests on it, silent (no commit, no answer) this long, is broken:
    #: its workers are restarted and its requests resume elsewhere; 0 never judges
    stall_timeout_s: float = 120.0
    #: a disconnected client's requests keep running this long (a reconnect within it loses
    #: nothing); then they are aborted
    client_reconnect_s: float = 30.0
    max_finished_records: int = 10_000  #: finished requests kept in full (older: in the totals)
    #: a client's event log (further behind: a "lost" event); 0 keeps none (nobody polls: the simulator)
    max_events_per_client: int = 20_000
    #: consecutive failed replica starts after which broken workers are no longer restarted
    max_start_failures: int = 3
    #: the shape planner plans for at least this arrival rate (1/s): SpotServe's required throughput
    required_rate: float = 0.0
    #: (prompt, output) tokens the shape planner plans for
    plan_workload: tuple[int, int] = (128, 64)

    def __post_init__(self) -> None:
        if self.parallel is not None and (len(self.parallel) != 2 or min(self.parallel) < 1):
            raise ValueError(f"parallel must be (P, M) with P, M >= 1 or None, not {self.parallel!r}")
        for name in ("migration_margin_s", "kv_bandwidth", "prefill_seconds_per_token", "start_timeout_s",
                     "call_timeout_s", "transfer_slack_s", "reshard_timeout_s", "stop_timeout_s", "rate_window_s",
                     "load_check_s", "default_step_seconds", "client_log_ttl_s", "client_reconnect_s", "stall_timeout_s",
                     "required_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"FleetConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("max_batch_size", "max_finished_records", "max_events_per_client"):
            least = 0 if name == "max_events_per_client" else 1  # 0: no event logs (a simulator)
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise ValueError(f"FleetConfig.{name} must be an integer >= {least}, got {getattr(self, name)!r}")
        if len(self.plan_workload) != 2 or min(self.plan_workload) < 1:
            raise ValueError(f"FleetConfig.plan_workload must be (prompt, output) >= 1, got {self.plan_workload!r}")

    @property
    def auto_parallel(self) -> bool:
        """Whether the planning core chooses the replicas' (P, M)."""
        return self.parallel is None

    @property
    def sharded(self) -> bool:
        """Whether replicas run over several workers."""
        return self.parallel is None or tuple(self.parallel) != (1, 1)
