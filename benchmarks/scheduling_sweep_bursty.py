"""Issue 20's sweep: FCFS, skip-join, las-guard, las-adaptive and the clairvoyant oracle on bursty heavy-tailed load.

Runs the live scheduler classes through the simulator (`elastic_llm.sim`) with the recorded
iteration-time model of this machine (`scheduling_sweep.DEFAULT_TIME_MODEL`) over batch sizes,
loads, arrival CVs (Gamma) and output-length samples (ShareGPT-shaped CV 1.0, Pareto CV 1.5,
lognormal CV 3, Pareto CV 3; lengths x0.15 as the live benchmark), and checks issue 20's targets
for "las-guard" (default guard) and "las-guard-y4" (a looser guard on requests short of the 90th
length percentile: `young_guard_factor=4`), both with the bundled sample's lengths as the Gittins
prior (`prior_lengths`, `learn_online=False`), "las-adaptive" (its defaults, the same prior) and
"las-adaptive-alone" (the same with `first_tokens_alone_at=0.25`):
mean JCT never > 3% worse than FCFS, P99 never > 20% worse, >= 1.5x on bursty
heavy-tailed load (arrival CV >= 4, output CV >= 1.5, 90% load, batch <= 8), and TTFT P99 >= 5x
better wherever queues form (FCFS's TTFT P99 above 3 iterations). Each row also carries
`ttft_p99_floor` (no schedule's TTFT P99 is lower), so the TTFT misses that no scheduler could
avoid are counted apart (`ttft_out_of_reach`).

Run:  .venv/bin/python benchmarks/scheduling_sweep_bursty.py [--requests 400] [--seeds 2] [--first-seed 0]
          [--batches 4,8,32] [--loads 0.5,0.9,0.95] [--cvs 1,4,8]
          [--datasets sharegpt,pareto-cv1.5,lognormal-cv3] [--policies las-adaptive,oracle] [--output rows.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_sweep import DEFAULT_TIME_MODEL, LENGTH_SCALE, capacity  # noqa: E402

from elastic_llm.scheduling import (  # noqa: E402
    FCFS,
    BatchLimits,
    LinearPrefillPredictor,
    MLFQConfig,
    RequestScheduler,
    SkipJoinMLFQ,
    WorkloadItem,
    make_scheduler,
    make_workload,
)
from elastic_llm.scheduling.las import LASConfig  # noqa: E402
from elastic_llm.scheduling.las_adaptive import AdaptiveLASConfig  # noqa: E402
from elastic_llm.scheduling.workloads import DATASETS, load_length_sample  # noqa: E402
from elastic_llm.sim import ShortestRemainingFirst, simulate  # noqa: E402
from elastic_llm.sim.ttft_floor import ttft_p99_floor  # noqa: E402

PREFILL = LinearPrefillPredictor(0.053, 0.00292)
POLICIES = ("fcfs", "skip-join", "las-guard", "las-guard-y4", "las-adaptive", "las-adaptive-alone", "oracle")
#: "las-adaptive-alone": first tokens alone once this share of the batch waits for one
ALONE_AT = 0.25


@dataclass(frozen=True)
class Row:
    dataset: str
    output_cv: float  #: measured CV of the scaled output lengths
    batch: int
    load: float
    arrival_cv: float
    fcfs_mean_s: float
    fcfs_p99_s: float
    fcfs_ttft_p99_s: float
    mean_gain: dict[str, float]  #: FCFS mean JCT / policy's (higher is better)
    p99_ratio: dict[str, float]  #: policy's P99 JCT / FCFS's (lower is better)
    ttft_p99_gain: dict[str, float]  #: FCFS TTFT P99 / policy's
    ttft_p99_s: dict[str, float] = field(default_factory=dict)  #: every policy's TTFT P99 (seconds)
    #: `ttft_p99_floor` of the row's workloads (mean over seeds): no schedule's TTFT P99 is lower
    ttft_floor_s: float = 0.0


def prior_lengths(dataset: str) -> tuple[int, ...]:
    """The bundled sample's output lengths at the benchmark's scale: las-guard's length prior."""
    return tuple(max(4, round(o * LENGTH_SCALE)) for _, o in load_length_sample(dataset))  # type: ignore[arg-type]


def build(name: str, rows: list[tuple[int, int]], step: float, dataset: str) -> RequestScheduler:
    if name == "fcfs":
        return FCFS()
    if name == "skip-join":
        return SkipJoinMLFQ(MLFQConfig(base_quantum_s=step, starvation_alpha_s=200 * step), PREFILL)
    if name == "oracle":
        return ShortestRemainingFirst({f"r{i}": o for i, (_, o) in enumerate(rows)})
    if name == "las-adaptive-alone":
        return make_scheduler("las-adaptive", las=AdaptiveLASConfig(
            prior_lengths=prior_lengths(dataset), learn_online=False, first_tokens_alone_at=ALONE_AT))
    if name == "las-adaptive":
        return make_scheduler("las-adaptive", las=AdaptiveLASConfig(prior_lengths=prior_lengths(dataset),
                                                                    learn_online=False))
    young = 4.0 if name == "las-guard-y4" else LASConfig().young_guard_factor
    config = LASConfig(prior_lengths=prior_lengths(dataset), learn_online=False, young_guard_factor=young)
    return make_scheduler("las-guard", las=config)


def point(dataset: str, batch: int, load: float, cv: float, args: argparse.Namespace) -> Row:
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    step = DEFAULT_TIME_MODEL(batch, batch)
    stats: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.policies}
    outputs: list[int] = []
    floors: list[float] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = make_workload(args.requests, 1.0, dataset, seed=seed)  # type: ignore[arg-type]
        rows = [(max(4, round(i.prompt_tokens * LENGTH_SCALE)), max(4, round(i.output_tokens * LENGTH_SCALE)))
                for i in base]
        outputs += [o for _, o in rows]
        rate = load * capacity(rows, DEFAULT_TIME_MODEL, limits)
        arrivals = make_workload(args.requests, rate, dataset, cv=cv, seed=seed)  # type: ignore[arg-type]
        items = [WorkloadItem(a.arrival_s, p, o) for a, (p, o) in zip(arrivals, rows)]
        floors.append(ttft_p99_floor(items, DEFAULT_TIME_MODEL, limits.max_batch_tokens))
        for name in args.policies:
            timings = simulate(build(name, rows, step, dataset), items, DEFAULT_TIME_MODEL, limits)
            jct = [t.completion_time_s for t in timings]
            ttft = [t.time_to_first_token_s for t in timings]
            stats[name].append((float(np.mean(jct)), float(np.percentile(jct, 99)),
                                float(np.percentile(ttft, 99))))
    mean = {k: float(np.mean([m for m, _, _ in v])) for k, v in stats.items()}
    p99 = {k: float(np.mean([p for _, p, _ in v])) for k, v in stats.items()}
    ttft = {k: float(np.mean([t for _, _, t in v])) for k, v in stats.items()}
    others = [k for k in args.policies if k != "fcfs"]
    return Row(dataset, float(np.std(outputs) / np.mean(outputs)), batch, load, cv, mean["fcfs"], p99["fcfs"],
               ttft["fcfs"], {k: round(mean["fcfs"] / mean[k], 3) for k in others},
               {k: round(p99[k] / p99["fcfs"], 3) for k in others},
               {k: round(ttft["fcfs"] / max(ttft[k], 1e-9), 2) for k in others},
               {k: round(v, 3) for k, v in ttft.items()}, round(float(np.mean(floors)), 3))


def step(row: Row) -> float:
    """Seconds of one full decode iteration at the row's batch size (the time model's)."""
    return DEFAULT_TIME_MODEL(row.batch, row.batch)


def check_targets(rows: list[Row], policy: str = "las-guard") -> dict[str, object]:
    """Issue 20's targets for `policy`, each with the worst row."""
    worst_mean = min(rows, key=lambda r: r.mean_gain[policy])
    worst_p99 = max(rows, key=lambda r: r.p99_ratio[policy])
    bursty = [r for r in rows if r.arrival_cv >= 4 and r.output_cv >= 1.5 and r.load == 0.9 and r.batch <= 8]
    queued = [r for r in rows if r.fcfs_ttft_p99_s > 3 * DEFAULT_TIME_MODEL(r.batch, r.batch)]
    worst_ttft = min(queued, key=lambda r: r.ttft_p99_gain[policy]) if queued else None
    return {
        "mean_never_3pct_worse": worst_mean.mean_gain[policy] >= 1 / 1.03,
        "worst_mean_gain": (worst_mean.mean_gain[policy], asdict(worst_mean)),
        "p99_never_20pct_worse": worst_p99.p99_ratio[policy] <= 1.2,
        "worst_p99_ratio": (worst_p99.p99_ratio[policy], asdict(worst_p99)),
        "bursty_1.5x": bool(bursty) and all(r.mean_gain[policy] >= 1.5 for r in bursty),
        "bursty_gains": [(r.dataset, r.batch, r.arrival_cv, r.mean_gain[policy], r.mean_gain["oracle"])
                         for r in bursty],
        "ttft_p99_5x_where_queues": worst_ttft is not None and worst_ttft.ttft_p99_gain[policy] >= 5,
        "rows_failing": {
            "mean": sum(r.mean_gain[policy] < 1 / 1.03 for r in rows),
            "p99": sum(r.p99_ratio[policy] > 1.2 for r in rows),
            "bursty": sum(r.mean_gain[policy] < 1.5 for r in bursty),
            "ttft": sum(r.ttft_p99_gain[policy] < 5 for r in queued),
            # a first token takes at least the rest of the running iteration and its own: about two
            # iterations; 5x is reachable only where FCFS's TTFT P99 exceeds 5 x that
            "ttft_reachable": sum(r.ttft_p99_gain[policy] < 5 for r in queued if r.fcfs_ttft_p99_s > 10 * step(r)),
            # misses where even the floor for any schedule leaves under 5x: out of reach, proven
            "ttft_out_of_reach": sum(r.ttft_p99_gain[policy] < 5 for r in queued
                                     if r.fcfs_ttft_p99_s < 5 * r.ttft_floor_s),
        },
        "rows": {"all": len(rows), "bursty": len(bursty), "queued": len(queued),
                 "queued_reachable": sum(r.fcfs_ttft_p99_s > 10 * step(r) for r in queued)},
        "worst_ttft_gain": None if worst_ttft is None else (worst_ttft.ttft_p99_gain[policy], asdict(worst_ttft)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--batches", default="4,8,32")
    parser.add_argument("--loads", default="0.5,0.9,0.95")
    parser.add_argument("--cvs", default="1,4,8")
    parser.add_argument("--datasets", default="sharegpt,pareto-cv1.5,lognormal-cv3")
    parser.add_argument("--policies", default=",".join(POLICIES[1:]), help=f"from {POLICIES[1:]} (FCFS always runs)")
    parser.add_argument("--output")
    args = parser.parse_args()
    args.policies = ["fcfs", *(p for p in args.policies.split(",") if p != "fcfs")]
    if any(p not in POLICIES for p in args.policies) or "oracle" not in args.policies:
        parser.error(f"policies from {POLICIES}; the oracle must run (the bursty rows report its gain)")
    try:
        batches = [int(x) for x in args.batches.split(",")]
        loads = [float(x) for x in args.loads.split(",")]
        cvs = [float(x) for x in args.cvs.split(",")]
    except ValueError as error:
        parser.error(str(error))
    datasets = args.datasets.split(",")
    if any(d not in DATASETS for d in datasets) or min(batches) < 1 or not all(0 < x < 1 for x in loads):
        parser.error(f"datasets from {DATASETS}, batches >= 1, loads in (0, 1)")
    if args.requests < 1 or args.seeds < 1 or args.first_seed < 0 or min(cvs) <= 0:
        parser.error("requests and seeds >= 1, first-seed >= 0, cvs > 0")
    grid = list(itertools.product(datasets, batches, loads, cvs))
    rows = []
    for i, (dataset, batch, load, cv) in enumerate(grid, 1):
        row = point(dataset, batch, load, cv, args)
        rows.append(row)
        print(f"[{i:3d}/{len(grid)}] {dataset:>15} (out CV {row.output_cv:.2f}) b{batch:<2} load {load:.0%} "
              f"arr CV {cv:g} | FCFS {row.fcfs_mean_s:6.1f} s P99 {row.fcfs_p99_s:6.1f} | "
              + " | ".join(f"{k} x{row.mean_gain[k]:.2f} P99 x{row.p99_ratio[k]:.2f} TTFT99 /{row.ttft_p99_gain[k]:.1f}"
                           for k in row.mean_gain), flush=True)
    targets = {name: check_targets(rows, name) for name in args.policies if name not in ("fcfs", "oracle")}
    for name, checks in targets.items():
        print(name, {k: v for k, v in checks.items() if isinstance(v, bool)},
              "worst mean", checks["worst_mean_gain"][0], "worst P99", checks["worst_p99_ratio"][0],  # type: ignore[index]
              "bursty", checks["bursty_gains"], "failing", checks["rows_failing"], checks["rows"], flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "targets": targets,
                                                 "rows": [asdict(r) for r in rows]}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
