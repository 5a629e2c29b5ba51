"""How much can a size-blind preemptive scheduler gain here? A simulator sweep, with an oracle bound.

Runs the live system's scheduler classes (FCFS, plain MLFQ, skip-join MLFQ) through the
discrete-event simulator (`elastic_llm.sim`) with iteration times fitted to this machine's engine,
over batch sizes, arrival burstiness (CV), starvation thresholds, loads, length mixes and seeds.
Next to them runs `ShortestRemainingFirst`, a clairvoyant policy that knows every output length:
no real engine can run it, and it bounds what reordering can buy on the workload.

Reports, per setting, mean and P99 JCT ratios against FCFS (mean: FCFS / policy, higher is better;
P99: policy / FCFS, lower is better), and the best skip-join setting that keeps P99 <= 1.2x FCFS.

Run:  .venv/bin/python benchmarks/scheduling_sweep.py [--requests 200] [--seeds 3] [--no-calibrate] [--point ...]
          [--output results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from elastic_llm.scheduling import (
    FCFS,
    BatchLimits,
    LinearPrefillPredictor,
    MLFQConfig,
    RequestScheduler,
    SkipJoinMLFQ,
    WorkloadItem,
    make_workload,
)
from elastic_llm.sim import IterationTimeModel, ShortestRemainingFirst, simulate

#: Fitted from this machine's measurements (1 torch thread, SmolLM2 fp32): decode 60 / 105 / 139 ms
#: at batch 1 / 4 / 8, prefill 53 ms + 2.92 ms per token (docs/benchmarks.md). Used by --no-calibrate.
DEFAULT_TIME_MODEL = IterationTimeModel(fixed_s=0.050, per_request_s=0.009, per_token_s=0.0029)
LENGTH_SCALE = 0.15  # the live benchmark's scale: mean output about 50 tokens


@dataclass(frozen=True)
class SweepRow:
    mix: str
    batch: int
    cv: float
    load: float
    alpha_steps: float
    seeds: int
    fcfs_mean_s: float
    fcfs_p99_s: float
    mlfq_mean_gain: float
    skip_join_mean_gain: float
    skip_join_p99_ratio: float
    oracle_mean_gain: float
    oracle_p99_ratio: float


def fit_prefill(engine: Any, lengths: tuple[int, ...], repeats: int) -> LinearPrefillPredictor:
    """A linear fit of one prompt's prefill time over its length (the fastest of `repeats` each)."""
    from elastic_llm import SamplingParams

    samples = []
    for length in lengths:
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.generate([list(range(100, 100 + length))], SamplingParams(max_new_tokens=1))
            runs.append(time.perf_counter() - started)
        samples.append((length, min(runs)))
    return LinearPrefillPredictor.fit(samples)


def decode_step(engine: Any, batch: int, new_tokens: int = 12) -> float:
    """Median seconds of one decode iteration of `batch` 24-token requests on the live `engine`."""
    from elastic_llm import SamplingParams

    for i in range(batch):
        engine.add_request(f"c{batch}-{i}", [100 + i] * 24, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    engine.step()  # the prefill
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    return statistics.median(steps)


def calibrate() -> tuple[IterationTimeModel, LinearPrefillPredictor]:
    """Fit the iteration-time model to the live engine: decode at batch 1 and 8, prefill over length."""
    import torch

    from elastic_llm import LLMEngine, SamplingParams
    from elastic_llm.model.loader import load_model

    torch.set_num_threads(1)
    engine = LLMEngine(load_model(), limits=BatchLimits(max_batch_size=8, max_batch_tokens=512))
    engine.generate([[101, 102, 103]], SamplingParams(max_new_tokens=2))

    one, eight = decode_step(engine, 1), decode_step(engine, 8)
    prefill = fit_prefill(engine, (16, 64, 128, 256), repeats=3)
    per_token = prefill.per_token_s
    per_request = max(0.0, (eight - one) / 7 - per_token)
    fixed = max(0.0, one - per_request - per_token)
    return IterationTimeModel(fixed, per_request, per_token), prefill


def lengths(n: int, mix: str, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths: ShareGPT-shaped, or a 50/50 mix with Alpaca-shaped requests."""
    share = make_workload(n, 1.0, "sharegpt", seed=seed)
    alpaca = make_workload(n, 1.0, "alpaca", seed=seed + 1000)
    pick = np.random.default_rng(seed + 2000).random(n)
    rows = []
    for i in range(n):
        item = share[i] if mix == "sharegpt" or pick[i] < 0.5 else alpaca[i]
        rows.append((max(4, round(item.prompt_tokens * LENGTH_SCALE)), max(4, round(item.output_tokens * LENGTH_SCALE))))
    return rows


def capacity(rows: list[tuple[int, int]], model: IterationTimeModel, limits: BatchLimits) -> float:
    """FCFS throughput with everything queued at t=0, counted while the batch is full (as live)."""
    timings = simulate(FCFS(), [WorkloadItem(0.0, p, o) for p, o in rows], model, limits)
    finishes = sorted(t.finish_s for t in timings)
    full = max(1, len(finishes) - limits.max_batch_size)
    return full / finishes[full - 1]


def jct(scheduler: RequestScheduler, workload: list[WorkloadItem], model: IterationTimeModel,
        limits: BatchLimits) -> tuple[float, float]:
    times = [t.completion_time_s for t in simulate(scheduler, workload, model, limits)]
    return float(np.mean(times)), float(np.percentile(times, 99))


def sweep_point(mix: str, batch: int, cv: float, load: float, alpha_steps: float, args: argparse.Namespace,
                model: IterationTimeModel, prefill: LinearPrefillPredictor) -> SweepRow:
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    step = model(batch, batch)
    results: dict[str, list[tuple[float, float]]] = {"fcfs": [], "mlfq": [], "skip": [], "oracle": []}
    for seed in range(args.seeds):
        rows = lengths(args.requests, mix, seed)
        arrivals = make_workload(args.requests, load * capacity(rows, model, limits), cv=cv, seed=seed)
        workload = [WorkloadItem(a.arrival_s, p, o) for a, (p, o) in zip(arrivals, rows)]

        def mlfq(skip_join: bool) -> SkipJoinMLFQ:
            config = MLFQConfig(base_quantum_s=step, skip_join=skip_join, starvation_alpha_s=alpha_steps * step)
            return SkipJoinMLFQ(config, prefill if skip_join else None)

        results["fcfs"].append(jct(FCFS(), workload, model, limits))
        results["mlfq"].append(jct(mlfq(False), workload, model, limits))
        results["skip"].append(jct(mlfq(True), workload, model, limits))
        oracle = ShortestRemainingFirst({f"r{i}": o for i, (_, o) in enumerate(rows)})
        results["oracle"].append(jct(oracle, workload, model, limits))
    mean = {k: float(np.mean([m for m, _ in v])) for k, v in results.items()}
    p99 = {k: float(np.mean([p for _, p in v])) for k, v in results.items()}
    return SweepRow(mix, batch, cv, load, alpha_steps, args.seeds, mean["fcfs"], p99["fcfs"],
                    mean["fcfs"] / mean["mlfq"], mean["fcfs"] / mean["skip"], p99["skip"] / p99["fcfs"],
                    mean["fcfs"] / mean["oracle"], p99["oracle"] / p99["fcfs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-calibrate", action="store_true", help="use the recorded time model")
    parser.add_argument("--point", help="only this setting: MIX,BATCH,CV,LOAD,ALPHA_STEPS (e.g. sharegpt,4,2,0.9,200)")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.no_calibrate:
        model, prefill = DEFAULT_TIME_MODEL, LinearPrefillPredictor(0.053, 0.00292)
    else:
        model, prefill = calibrate()
    print(f"time model: {model}; prefill {prefill}", flush=True)
    rows = []
    grid = list(itertools.product(("sharegpt", "mixed"), (2, 4, 8), (1.0, 2.0), (0.5, 0.9), (30.0, 200.0, 1000.0)))
    if args.point:
        mix, batch, cv, load, alpha = args.point.split(",")
        grid = [(mix, int(batch), float(cv), float(load), float(alpha))]
    for i, point in enumerate(grid, 1):
        row = sweep_point(*point, args, model, prefill)
        rows.append(row)
        print(f"[{i:3d}/{len(grid)}] {row.mix:>8} batch {row.batch} cv {row.cv:.0f} load {row.load:.0%} "
              f"alpha {row.alpha_steps:6.0f} steps | FCFS mean {row.fcfs_mean_s:6.2f} s P99 {row.fcfs_p99_s:6.2f} s"
              f" | skip-join mean x{row.skip_join_mean_gain:.2f} P99 x{row.skip_join_p99_ratio:.2f}"
              f" | MLFQ mean x{row.mlfq_mean_gain:.2f} | oracle mean x{row.oracle_mean_gain:.2f}"
              f" P99 x{row.oracle_p99_ratio:.2f}", flush=True)
    eligible = [r for r in rows if r.skip_join_p99_ratio <= 1.2]
    best = max(rows, key=lambda r: r.skip_join_mean_gain)
    print(f"best skip-join mean gain: x{best.skip_join_mean_gain:.2f} (P99 x{best.skip_join_p99_ratio:.2f}) at {best}")
    if eligible:
        best_ok = max(eligible, key=lambda r: r.skip_join_mean_gain)
        print(f"best with P99 <= 1.2x FCFS: x{best_ok.skip_join_mean_gain:.2f} at {best_ok}")
    print(f"best oracle mean gain: x{max(r.oracle_mean_gain for r in rows):.2f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"time_model": asdict(model), "prefill": asdict(prefill), "args": vars(args),
                       "rows": [asdict(r) for r in rows]}, handle, indent=2)


if __name__ == "__main__":
    main()
