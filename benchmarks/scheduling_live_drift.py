"""How far can a live run stray from the simulator on this machine alone? The live check's own drift, replayed.

`scheduling_live_check.py` compares the live engine's FCFS / policy ratios with the simulator's on
an iteration-time model fitted to the live iterations. Its mean and P99 JCT ratios agree within
15%; its TTFT P99 gain does in about half of the runs. This benchmark asks whether a perfect
simulator would do better on this machine. It reads a live check's JSON (its recorded
iterations) and re-runs the simulator (the live scheduler classes, the same requests, the same
refitted model) with each iteration's time multiplied by the machine's measured drift:

- `iid`: a live iteration's relative residual (seconds / model), drawn independently;
- `drift`: the recorded sequence of relative residuals, read in order from a random start (each
  policy run its own), so slow periods of the machine are kept as they came.

Each replay pools `repeats` runs per policy as the live check does. Printed per setting: the
deterministic ratios (they equal the JSON's "simulated"), the live ones, and for each noise kind
the 10/50/90th percentiles of replayed / deterministic for mean gain, P99 ratio and TTFT P99
gain, the share of replays with each within 15%, and where the live run falls among them.

Run:  .venv/bin/python benchmarks/scheduling_live_drift.py docs/results/scheduling_live_check_72req_2026-12-04.json
          [--replays 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_live_check import Ratios, policies, ratios  # noqa: E402

from elastic_llm.scheduling import BatchLimits, WorkloadItem, make_workload  # noqa: E402
from elastic_llm.sim import IterationTimeModel, simulate  # noqa: E402

METRICS = ("mean_gain", "p99_ratio", "ttft_p99_gain")


def workload(result: dict, args: argparse.Namespace) -> list[WorkloadItem]:
    """The live check's requests for one setting, rebuilt as `run_setting` built them."""
    base = make_workload(args.requests, 1.0, result["dataset"], seed=args.seed)
    rows = [(max(4, round(i.prompt_tokens * args.length_scale)),
             min(args.max_output, max(4, round(i.output_tokens * args.length_scale)))) for i in base]
    arrivals = make_workload(args.requests, result["rate_req_s"], result["dataset"], cv=result["arrival_cv"],
                             seed=args.seed)
    return [WorkloadItem(a.arrival_s, p, o) for a, (p, o) in zip(arrivals, rows)]


def replay(result: dict, args: argparse.Namespace, noise: Callable[[], Callable[[int, int], float]],
           repeats: int) -> Ratios:
    """The simulated ratios with `repeats` runs per policy pooled, each run timed by a fresh `noise()`."""
    items = workload(result, args)
    limits = BatchLimits(max_batch_size=result["batch"], max_batch_tokens=512)
    pooled: dict[str, tuple[list[float], list[float]]] = {}
    for _ in range(repeats):
        for name, scheduler in policies(result["dataset"], args).items():
            timings = simulate(scheduler, items, noise(), limits)
            jct, ttft = pooled.setdefault(name, ([], []))
            jct += [t.completion_time_s for t in timings]
            ttft += [t.time_to_first_token_s for t in timings]
    return ratios(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("live_check_json", type=Path)
    parser.add_argument("--replays", type=int, default=20)
    options = parser.parse_args()
    if options.replays < 2:
        parser.error("need --replays >= 2")
    data = json.loads(options.live_check_json.read_text(encoding="utf-8"))
    args = argparse.Namespace(**data["args"])
    for result in data["results"]:
        model = IterationTimeModel(**result["refitted_time_model"])
        sequence = np.concatenate([
            [seconds / model(int(b), int(t)) for b, t, seconds in result["live_iterations"][name]]
            for name in ("fcfs", "las-guard")])
        exact = replay(result, args, lambda: model, 1)
        live = result["live"]
        print(f"{result['dataset']} b{result['batch']} CV {result['arrival_cv']:g} {result['load']:.0%} "
              f"({len(sequence)} live iterations, relative residual sd {sequence.std():.3f}, lag-1 autocorrelation "
              f"{np.corrcoef(sequence[:-1], sequence[1:])[0, 1]:.2f})", flush=True)
        print("  deterministic " + " ".join(f"{k} {getattr(exact, k):.3f}" for k in METRICS)
              + " | live " + " ".join(f"{k} {live[k]:.3f}" for k in METRICS)
              + " | live / deterministic " + " ".join(f"{live[k] / getattr(exact, k):.3f}" for k in METRICS))
        for kind in ("iid", "drift"):
            rng = np.random.default_rng(0)

            def noise(kind: str = kind) -> Callable[[int, int], float]:
                if kind == "iid":
                    return lambda b, t: model(b, t) * float(sequence[rng.integers(len(sequence))])
                position = [int(rng.integers(len(sequence)))]

                def timed(b: int, t: int) -> float:
                    position[0] += 1
                    return model(b, t) * float(sequence[position[0] % len(sequence)])
                return timed

            runs = [replay(result, args, noise, args.repeats) for _ in range(options.replays)]
            cells = []
            for k in METRICS:
                scaled = np.array([getattr(r, k) for r in runs]) / getattr(exact, k)
                live_scaled = live[k] / getattr(exact, k)
                cells.append(f"{k} {np.round(np.percentile(scaled, [10, 50, 90]), 3).tolist()} "
                             f"within 15%: {np.mean(np.abs(scaled - 1) <= 0.15):.2f}, "
                             f"live at rank {np.mean(scaled < live_scaled):.2f}")
            print(f"  {kind:5s} ({options.replays} replays, replayed / deterministic 10/50/90%): " + " | ".join(cells),
                  flush=True)


if __name__ == "__main__":
    main()
