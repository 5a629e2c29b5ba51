"""Replay a spot trace and a request workload against one controller policy on a LocalCluster.

Each run starts its own cluster with real worker processes: the trace's initial instances join
first and their replicas load the model; then the clock starts and, at the same moment, the spot
emulator replays the rest of the trace (notices, SIGKILLs, new workers) while a thread submits the
requests at their Poisson arrival times through `ServingClient`. The report holds what was
measured: latency percentiles, throughput, requests that lost their KV, bytes migrated, dollars.
A capacity-aware policy's periods (`CapacityPolicy`: how long a shortfall or a surplus lasts
before it acts) are trace seconds like the grace period, compressed by the same time scale.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from distributed import Client, LocalCluster

from elastic_llm.cluster.capacity_fulfiller import CapacityFulfiller
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient, ServingFuture
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.traces import SpotTrace, load_trace
from elastic_llm.control.policies import compressed
from elastic_llm.model.checkpoint import DEFAULT_MODEL
from elastic_llm.scheduling.workloads import make_workload

PROMPTS = (
    "Tell me a story about a dragon who learns to cook.",
    "What is the capital of France, and why is it famous?",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Explain how a computer works to a ten-year-old.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
    "How do plants make their food?",
    "Describe a day in the life of a lighthouse keeper.",
)


@dataclass(frozen=True)
class ReplayConfig:
    """One replay's trace, workload and replica settings (the same for every policy compared)."""

    model: str = DEFAULT_MODEL  #: model every replica serves
    trace: str = "A_S"  #: bundled trace name
    max_instances: int = 4  #: cap on live workers (see `SpotTrace.capped`)
    time_scale: float = 30.0  #: trace seconds per wall second
    grace_s: float = 120.0  #: preemption grace period, trace seconds (AWS: 2 minutes)
    requests: int = 24  #: requests in the workload
    rate_per_s: float = 0.5  #: Poisson arrival rate, requests per wall second
    max_new_tokens: int = 96  #: cap on each request's output (ShareGPT-shaped lengths, capped)
    seed: int = 0  #: workload seed
    replica: ReplicaOptions = field(default_factory=lambda: ReplicaOptions(model=DEFAULT_MODEL))
    #: profile the planning core chooses sharded shapes with (`ReplicaOptions.parallel="auto"`)
    profile: str | None = None
    #: requests/s the fleet must be able to serve (SpotServe's required throughput): the shape
    #: planner plans for it and a capacity-aware policy (``beyond``) asks for on-demand
    #: instances when the spot ones cannot meet it; 0: the measured arrival rate only
    required_rate: float = 0.0

    def check(self) -> None:
        """Raise `ClusterConfigError` naming the first bad setting (before any cluster starts):
        counts and rates out of range, an unknown trace, a cap the trace cannot be held to."""
        if self.requests < 1 or self.max_new_tokens < 1 or self.max_instances < 1:
            raise ClusterConfigError("requests, max_new_tokens and max_instances must be >= 1")
        if not (self.rate_per_s > 0 and self.time_scale > 0 and self.grace_s >= 0 and self.required_rate >= 0):
            raise ClusterConfigError("rate and time scale must be > 0, grace and required rate >= 0")
        load_trace(self.trace).capped(self.max_instances)


@dataclass(frozen=True)
class PolicyReport:
    """What one policy did on the replay."""

    policy: str
    completed: int  #: requests that finished
    lost: int  #: requests that never finished (must be 0)
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    latency_mean_s: float
    throughput_tok_s: float  #: generated tokens / makespan
    requests_recomputed: int  #: requests that lost their replica at least once
    tokens_recomputed: int  #: committed tokens computed again
    kv_bytes_migrated: int  #: KV moved by stateful migration
    cost_usd: float  #: instance-seconds x price, in trace time (wall seconds x time_scale)
    usd_per_1k_tokens: float | None  #: in trace time
    on_demand_usd_per_1k_tokens: float | None  #: the same instance time at on-demand price
    controller_overhead: float  #: replica loop time outside `step()` / time in `step()`
    wall_s: float
    weight_bytes_from_peers: int = 0  #: weights new replicas took from peers instead of the checkpoint
    prefix_tokens_reused: int = 0  #: prompt tokens whose KV came from the replicas' prefix caches
    instances_acquired: int = 0  #: instances the policy asked for (``beyond``: on demand), all started
    instances_released: int = 0  #: instances the policy gave back


def initial_and_rest(trace: SpotTrace) -> tuple[list[str], SpotTrace]:
    """The instances live at offset 0, and the trace without their acquisition."""
    initial = [e.instance_id for e in trace.events if e.offset_s == 0 and e.action == "acquire"]
    rest = tuple(e for e in trace.events if not (e.offset_s == 0 and e.action == "acquire"))
    return initial, replace(trace, events=rest)


def run_policy(policy: str, config: ReplayConfig,
               on_progress: Callable[[str], None] = lambda line: None) -> PolicyReport:
    """Serve the workload under `policy` while the trace churns the fleet; measure everything."""
    trace = load_trace(config.trace).capped(config.max_instances)
    initial, rest = initial_and_rest(trace)
    workload = make_workload(config.requests, config.rate_per_s, "sharegpt", seed=config.seed,
                             max_output_tokens=config.max_new_tokens)
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        emulator = SpotEmulator(cluster, rest, time_scale=config.time_scale, grace_s=config.grace_s)
        fulfiller = CapacityFulfiller(client, emulator)  # what a capacity-aware policy asks for
        fulfiller.start()
        for event in (e for e in trace.events if e.instance_id in initial and e.action == "acquire"):
            emulator.acquire(event.instance_id, market=event.market, price_per_hour=event.price_per_hour)
        llm = ServingClient(client, model=config.model, policy=compressed(policy, config.time_scale),
                            replica=config.replica,
                            migration_margin_s=0.5, profile=config.profile, required_rate=config.required_rate)
        if not config.replica.sharded:  # one replica per worker
            llm.wait_for_replicas(len(initial))
        on_progress(f"[{policy}] replaying {trace.name} ({trace.duration_s:.0f} s at "
                    f"x{config.time_scale:g}) with {config.requests} requests")
        started = time.time()
        emulator.start()
        if config.replica.sharded:  # the first workers may be too few for any shape: the trace adds more
            llm.wait_for_replicas(1, timeout=600)
        futures: list[ServingFuture] = []
        submitter = threading.Thread(target=_submit_at_arrivals,
                                     args=(llm, workload, started, futures), daemon=True)
        submitter.start()
        submitter.join()
        latencies, tokens = [], 0
        for done, future in enumerate(ServingClient.as_completed(futures, timeout=1800), 1):
            result = future.result()
            latencies.append(result.finish_time - result.arrival_time)
            tokens += len(result.token_ids)
            if done % max(1, len(futures) // 6) == 0 or done == len(futures):
                on_progress(f"[{policy}] {done}/{len(futures)} requests done, "
                            f"{len(emulator.live)} worker(s) live")
        makespan = time.time() - started
        emulator.stop()
        status = llm.status()
        llm.close()
    cost = status["cost"]
    return PolicyReport(
        policy=policy, completed=len(latencies), lost=len(workload) - len(latencies),
        latency_p50_s=float(np.percentile(latencies, 50)), latency_p90_s=float(np.percentile(latencies, 90)),
        latency_p99_s=float(np.percentile(latencies, 99)), latency_mean_s=float(np.mean(latencies)),
        throughput_tok_s=tokens / makespan, requests_recomputed=status["requests_restarted"],
        tokens_recomputed=status["tokens_recomputed"], kv_bytes_migrated=status["kv_bytes_migrated"],
        cost_usd=(cost["spot_usd"] + cost["on_demand_usd"] + cost["unknown_usd"]) * config.time_scale,
        usd_per_1k_tokens=_scaled(cost["usd_per_1k_tokens"], config.time_scale),
        on_demand_usd_per_1k_tokens=_scaled(cost["on_demand_only_usd_per_1k_tokens"], config.time_scale),
        controller_overhead=status["controller_overhead"], wall_s=makespan,
        weight_bytes_from_peers=status["weight_bytes_from_peers"],
        prefix_tokens_reused=status["prefix_tokens_reused"],
        instances_acquired=status["capacity"]["acquired"], instances_released=status["capacity"]["released"])


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _submit_at_arrivals(llm: ServingClient, workload: tuple, started: float,  # type: ignore[type-arg]
                        futures: list[ServingFuture]) -> None:
    for i, item in enumerate(workload):
        time.sleep(max(0.0, started + item.arrival_s - time.time()))
        futures.append(llm.submit(PROMPTS[i % len(PROMPTS)], max_new_tokens=item.output_tokens,
                                  ignore_eos=True))
