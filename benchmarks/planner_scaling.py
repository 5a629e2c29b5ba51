"""Planning-core scaling benchmark (issue 4): planner wall time, and bytes moved by KM vs rank order.

Run on demand (not a test):

    .venv/bin/python benchmarks/planner_scaling.py            # full sweep, 8..512 instances
    .venv/bin/python benchmarks/planner_scaling.py --quick    # 8..64 instances

Setup: GPT-20B (fp32, 80 GB) on T4 instances, analytic profile, prompt 512 / 128 output tokens,
arrival rate 0.035 req/s per GPU. A *reconfiguration* starts from the optimizer's choice on N
instances, preempts 10% of the instances (at least one) and acquires a random 0-10% more, then
runs the whole churn path: optimizer -> KM device mapper -> migration planner. Interrupted batches
hold 4 requests x 600 cached tokens. Wall time is the median over repeats of that path.

Bytes moved compare the KM placement with SpotServe's "no device mapper" ablation: survivors in
their old rank order, then newcomers, filling the new positions in canonical order (same replica
inheritance). Trace-driven runs replay SpotServe's A_S and B_S instance sequences on
g4dn.12xlarge (4 x T4) with the preempted / acquired instances chosen at random.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_llm.model.spec import DESCRIBED_MODELS  # noqa: E402
from elastic_llm.planning import (  # noqa: E402
    ConfigOptimizer,
    CostModel,
    DeviceMapper,
    MigrationPlanner,
    ParallelConfig,
    Placement,
    SearchSpace,
    Worker,
    Workload,
    analytic_profile,
)

MODEL = DESCRIBED_MODELS["gpt-20b"]
TRACES = {"A_S": (7, 8, 10, 9, 10, 8), "B_S": (10, 8, 7, 8, 9)}
TOKENS_PER_BATCH = 4 * 600


@dataclass
class Fleet:
    """Instances alive now: {instance: [worker, ...]} plus the running placement."""

    kind: str
    instances: dict[str, list[Worker]]
    placement: Placement | None = None
    counter: int = 0

    def add(self, count: int) -> None:
        profile = analytic_profile(self.kind)
        memory = profile.device.memory_bytes  # physical memory bounds a migration
        for _ in range(count):
            name = f"i{self.counter}"
            self.counter += 1
            self.instances[name] = [
                Worker(f"{name}.g{g}", name, memory_bytes=memory,
                       bandwidth=profile.network_bandwidth)
                for g in range(profile.devices_per_instance)]

    def workers(self) -> list[Worker]:
        return [w for group in self.instances.values() for w in group]


def rank_order(workers: list[Worker], old: Placement | None, new: ParallelConfig) -> Placement:
    """SpotServe's ablation without the device mapper: survivors by old rank, then newcomers."""
    def key(w: Worker) -> tuple[int, int]:
        pos = old.position_of(w.name) if old else None
        return (0, old.config.index_of(pos)) if pos is not None and old else (1, 0)
    ordered = sorted(workers, key=key)
    return Placement(new, tuple(w.name for w in ordered[:new.num_positions]))


@dataclass
class Planners:
    """The policy objects a controller keeps for its whole life (their caches stay warm)."""

    optimizer: ConfigOptimizer
    mapper: DeviceMapper
    planner: MigrationPlanner


def planners_for(kind: str) -> Planners:
    cost = CostModel(MODEL, analytic_profile(kind), Workload(512, 128))
    return Planners(ConfigOptimizer(cost, SearchSpace(batch_sizes=(4,))), DeviceMapper(MODEL),
                    MigrationPlanner(MODEL, intra_instance_bandwidth=8e9))


def reconfigure(fleet: Fleet, policy: Planners, rng: random.Random, lose: int,
                gain: int, compare: bool) -> dict[str, float]:
    """One churn event; returns timings (s) and bytes moved (KM and, if asked, rank order)."""
    old = fleet.placement
    leaving = rng.sample(sorted(fleet.instances), min(lose, len(fleet.instances) - 1))
    senders = [w for name in leaving for w in fleet.instances.pop(name)]
    fleet.add(gain)
    workers = fleet.workers()
    devices = len(workers)
    tokens = {r: TOKENS_PER_BATCH for r in range(old.config.D)} if old else {}
    t0 = time.perf_counter()
    choice = policy.optimizer.choose(len(fleet.instances), 0.035 * devices)
    t1 = time.perf_counter()
    mapping = policy.mapper.map(workers, old, choice.config, tokens)
    t2 = time.perf_counter()
    planner = policy.planner
    plan = planner.plan(mapping.placement, workers + senders, old, tokens, mapping.inherits)
    t3 = time.perf_counter()
    out = {"optimizer": t1 - t0, "mapper": t2 - t1, "planner": t3 - t2, "total": t3 - t0,
           "km_bytes": plan.weight_bytes + plan.kv_bytes, "transfers": len(plan.transfers),
           "positions": choice.config.num_positions}
    if compare:
        naive = rank_order(workers, old, choice.config)
        naive_plan = planner.plan(naive, workers + senders, old, tokens, mapping.inherits)
        out["rank_bytes"] = naive_plan.weight_bytes + naive_plan.kv_bytes
    fleet.placement = mapping.placement
    return out


def scaling(kind: str, sizes: list[int], repeats: int, seed: int) -> None:
    print(f"\n### Wall time per reconfiguration, {kind} (median of {repeats})\n")
    print("| instances | devices | positions | optimizer ms | mapper ms | planner ms | total ms "
          "| transfers | KM GB moved | rank-order GB moved |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    policy = planners_for(kind)
    for n in sizes:
        rows = []
        for r in range(repeats):
            rng = random.Random(seed + 1000 * n + r)
            fleet = Fleet(kind, {})
            fleet.add(n)
            reconfigure(fleet, policy, rng, 0, 0, compare=False)  # cold start placement
            rows.append(reconfigure(fleet, policy, rng, max(1, n // 10),
                                    rng.randint(0, max(1, n // 10)), compare=True))
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"| {n} | {n * len(fleet.instances[next(iter(fleet.instances))])} "
              f"| {med['positions']:.0f} | {med['optimizer'] * 1e3:.1f} | {med['mapper'] * 1e3:.1f} "
              f"| {med['planner'] * 1e3:.1f} | {med['total'] * 1e3:.1f} | {med['transfers']:.0f} "
              f"| {med['km_bytes'] / 1e9:.1f} | {med['rank_bytes'] / 1e9:.1f} |")


def traces(seeds: int) -> None:
    print(f"\n### Trace-driven (g4dn.12xlarge, GPT-20B), bytes moved summed over the trace, "
          f"mean of {seeds} seeds\n")
    print("| trace | events | KM GB moved | rank-order GB moved | KM saves |")
    print("|---|---|---|---|---|")
    policy = planners_for("g4dn.12xlarge")
    for name, counts in TRACES.items():
        km, naive = [], []
        for seed in range(seeds):
            rng = random.Random(seed)
            fleet = Fleet("g4dn.12xlarge", {})
            fleet.add(counts[0])
            reconfigure(fleet, policy, rng, 0, 0, compare=False)
            total_km = total_naive = 0.0
            for before, after in zip(counts, counts[1:]):
                lose, gain = max(0, before - after), max(0, after - before)
                row = reconfigure(fleet, policy, rng, lose, gain, compare=True)
                total_km += row["km_bytes"]
                total_naive += row["rank_bytes"]
            km.append(total_km)
            naive.append(total_naive)
        a, b = statistics.mean(km), statistics.mean(naive)
        print(f"| {name} | {len(counts) - 1} | {a / 1e9:.1f} | {b / 1e9:.1f} | {1 - a / b:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8..64 instances only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128, 256, 512]
    # 8 single-T4 instances cannot hold GPT-20B in fp32 (it needs at least 10 T4s)
    scaling("g4dn.xlarge", [n for n in sizes if n >= 16], args.repeats, args.seed)
    scaling("g4dn.12xlarge", sizes, args.repeats, args.seed)
    traces(seeds=3 if args.quick else 10)


if __name__ == "__main__":
    main()
