"""Issue 20, second pass: the measurements behind "las-adaptive"'s rules, side by side with FCFS.

Each study runs FCFS and a few variants of the policy through the simulator (the live classes,
`scheduling_sweep.DEFAULT_TIME_MODEL` unless the study says otherwise) on the same workloads as
`scheduling_sweep_bursty.py` (400 requests, lengths x0.15, the bundled sample as the Gittins
prior), and prints per variant: mean JCT gain over FCFS / P99 JCT ratio to FCFS / TTFT P99 gain.

- `first-token`: where a newcomer's prefill + first token run (ShareGPT-shaped lengths): in a
  decode slot (las-guard), in 1-8 extra slots, or only after waiting 10 or 50 iterations.
- `free-prefill`: the same with prefill tokens costing nothing (the decode iteration unchanged):
  how much of the first-token cost is the prefill work moved ahead of the queue.
- `guard`: the young slack on heavy tails (`young_guard_heavy`, `guard_quantile`), with and
  without the burstiness gate, and no guard at all (the size-blind ceiling of this order).
- `ttft-floor`: the 11 sweep rows where las-adaptive's TTFT P99 gain is under 5x although a queue
  forms: more first-token slots (a whole batch, eight batches), iterations of first tokens alone
  whenever one is due or once a quarter / half of the batch waits (`first_tokens_alone_at`), and `elastic_llm.sim.ttft_floor.ttft_p99_floor`, a lower bound on the TTFT
  P99 of any schedule (its "gain" is the most any scheduler can show on the row).

Run:  .venv/bin/python benchmarks/scheduling_adaptive_ablation.py [--study first-token|free-prefill|guard|ttft-floor]
          [--seeds 2] [--first-seed 0] [--requests 400]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_sweep import DEFAULT_TIME_MODEL, LENGTH_SCALE, capacity  # noqa: E402
from scheduling_sweep_bursty import prior_lengths  # noqa: E402

from elastic_llm.scheduling import FCFS, BatchLimits, RequestScheduler, WorkloadItem, make_workload  # noqa: E402
from elastic_llm.scheduling.las import GuardedLAS, LASConfig  # noqa: E402
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig  # noqa: E402
from elastic_llm.sim import IterationTimeModel, simulate  # noqa: E402
from elastic_llm.sim.ttft_floor import ttft_p99_floor  # noqa: E402

Build = Callable[[tuple[int, ...]], RequestScheduler]
FLOOR = "floor"  #: not a policy: `ttft_p99_floor`, the TTFT P99 no schedule can beat (gain = FCFS's / it)
Point = tuple[str, int, float, float]  # dataset, batch, load, arrival CV


def guard(**settings: object) -> Build:
    return lambda prior: GuardedLAS(LASConfig(prior_lengths=prior, learn_online=False, **settings))  # type: ignore[arg-type]


def adaptive(**settings: object) -> Build:
    return lambda prior: AdaptiveLAS(AdaptiveLASConfig(prior_lengths=prior, learn_online=False,
                                                       **settings))  # type: ignore[arg-type]


NO_GUARD = dict(min_guard_s=1e6, max_guard_s=1e6)
FIRST_TOKEN = {"las-guard": guard(), "slots-1": adaptive(first_token_slots=1e-9),
               "slots-1/4": adaptive(), "slots-1/2": adaptive(first_token_slots=0.5),
               "decode-slot": adaptive(first_token_slots=0), "wait-10": adaptive(first_token_wait_iterations=10),
               "wait-50": adaptive(first_token_wait_iterations=50)}
SHAREGPT: list[Point] = [("sharegpt", 4, 0.9, 4), ("sharegpt", 8, 0.9, 4), ("sharegpt", 8, 0.9, 8),
                         ("sharegpt", 32, 0.9, 8), ("sharegpt", 8, 0.5, 8)]
GUARD = {"las-guard": guard(), "default": adaptive(), "heavy-4": adaptive(young_guard_heavy=4),
         "heavy-7-q95": adaptive(young_guard_heavy=7, guard_quantile=0.95, tail_cv_heavy=3.0),
         "no-burst-gate": adaptive(bursty_arrival_cv=0.0), "no-guard": adaptive(**NO_GUARD)}
HEAVY: list[Point] = [(d, b, load, cv) for d in ("lognormal-cv3", "pareto-cv3") for b in (4, 8)
                      for load, cv in ((0.9, 4), (0.9, 8), (0.95, 4))] + [("lognormal-cv3", 4, 0.95, 1),
                                                                          ("pareto-cv1.5", 8, 0.9, 4)]
TTFT_FLOOR: dict[str, Build | None] = {"default": adaptive(), "slots-1": adaptive(first_token_slots=1.0),
              "slots-8": adaptive(first_token_slots=8.0), "alone": adaptive(first_tokens_alone_at=1e-9),
              "alone-if-1/4": adaptive(first_tokens_alone_at=0.25),
              "alone-if-1/2": adaptive(first_tokens_alone_at=0.5), FLOOR: None}
#: sweep rows (docs/results/scheduling_sweep_bursty_adaptive_2026-12-03.json) where FCFS's TTFT P99
#: is over 3 iterations and las-adaptive's gain on it under 5x
TTFT_MISSES: list[Point] = [("sharegpt", 8, 0.5, 1), ("pareto-cv1.5", 8, 0.5, 1), ("lognormal-cv3", 8, 0.5, 1),
                            ("pareto-cv3", 4, 0.5, 1), ("pareto-cv3", 8, 0.5, 1), ("lognormal-cv3", 32, 0.95, 1),
                            ("pareto-cv3", 32, 0.9, 1), ("pareto-cv3", 32, 0.95, 1), ("lognormal-cv3", 32, 0.5, 4),
                            ("lognormal-cv3", 32, 0.5, 8), ("pareto-cv3", 32, 0.5, 4)]
STUDIES: dict[str, tuple[Mapping[str, Build | None], list[Point], IterationTimeModel]] = {
    "first-token": (FIRST_TOKEN, SHAREGPT, DEFAULT_TIME_MODEL),
    "free-prefill": ({"las-guard": guard(), "slots-1/4": adaptive()}, SHAREGPT,
                     IterationTimeModel(DEFAULT_TIME_MODEL.fixed_s,
                                        DEFAULT_TIME_MODEL.per_request_s + DEFAULT_TIME_MODEL.per_token_s, 0.0)),
    "guard": (GUARD, HEAVY, DEFAULT_TIME_MODEL),
    "ttft-floor": (TTFT_FLOOR, TTFT_MISSES, DEFAULT_TIME_MODEL),
}


def measure(point: Point, variants: Mapping[str, Build | None], model: IterationTimeModel,
            args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """{variant: (mean gain, P99 ratio, TTFT P99 gain)} against FCFS, means over the seeds."""
    dataset, batch, load, cv = point
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    stats: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ("fcfs", *variants)}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = make_workload(args.requests, 1.0, dataset, seed=seed)  # type: ignore[arg-type]
        rows = [(max(4, round(i.prompt_tokens * LENGTH_SCALE)), max(4, round(i.output_tokens * LENGTH_SCALE)))
                for i in base]
        rate = load * capacity(rows, model, limits)
        arrivals = make_workload(args.requests, rate, dataset, cv=cv, seed=seed)  # type: ignore[arg-type]
        items = [WorkloadItem(a.arrival_s, p, o) for a, (p, o) in zip(arrivals, rows)]
        prior = prior_lengths(dataset)
        for name in stats:
            build = variants.get(name)
            if name == FLOOR:
                stats[name].append((math.nan, math.nan, ttft_p99_floor(items, model, limits.max_batch_tokens)))
                continue
            scheduler = FCFS() if build is None else build(prior)
            timings = simulate(scheduler, items, model, limits)
            jct = [t.completion_time_s for t in timings]
            stats[name].append((float(np.mean(jct)), float(np.percentile(jct, 99)),
                                float(np.percentile([t.time_to_first_token_s for t in timings], 99))))
    mean = {k: np.mean(v, axis=0) for k, v in stats.items()}
    fcfs = mean.pop("fcfs")
    return {k: (float(fcfs[0] / m[0]), float(m[1] / fcfs[1]), float(fcfs[2] / m[2])) for k, m in mean.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), action="append")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    if args.requests < 1 or args.seeds < 1 or args.first_seed < 0:
        parser.error("need --requests >= 1, --seeds >= 1, --first-seed >= 0")
    for study in args.study or sorted(STUDIES):
        variants, points, model = STUDIES[study]
        print(f"## {study} (mean gain / P99 ratio / TTFT P99 gain vs FCFS)", flush=True)
        for point in points:
            result = measure(point, variants, model, args)
            cells = " | ".join(f"{k} {t:.1f}x" if k == FLOOR else f"{k} {m:.3f}/{p:.3f}/{t:.1f}x"
                               for k, (m, p, t) in result.items())
            print(f"{point[0]:>13} b{point[1]:<2} load {point[2]:.0%} CV {point[3]:g} | {cells}", flush=True)


if __name__ == "__main__":
    main()
