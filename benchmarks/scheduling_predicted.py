"""Issue 20 with an output-length predictor: FCFS, las-adaptive, las-predicted and the oracle on the
bundled prompt sample (prompts that carry their answer's length), in the simulator.

Each seed splits the bundled prompt sample (`elastic_llm/scheduling/prompt_sample.py`) in two: the
predictor (`PromptLengthPredictor`) is fitted on one half and the workloads draw their prompts from
the other (held out), so every prediction is of a prompt the predictor never saw. Policies:

- "fcfs";
- "las-adaptive": size-blind, the training half's lengths as its Gittins prior;
- "las-predicted-rank": per-class Gittins order, no express lane (`express_mean_fraction=0`);
- "las-predicted": the shipped express lane (per-class order and the lane's defaults);
- "las-predicted-lane": the same with the lane held to a quarter of the batch (`express_batch_share`);
- "las-predicted-perfect": the shipped policy with a clairvoyant predictor (`ClairvoyantClasses`:
  one class per true length, each prompt in its own length's class), so the gap between it and
  "las-predicted" is what the predictor's errors cost, and the gap between it and the oracle is
  what the policy's guard and lane cost;
- "oracle": shortest remaining output first, told every length.

Every LAS policy uses the training half's lengths as its prior and does not learn online
(`learn_online=False`, as in the other sweeps).

Mixes: "uniform" (every family alike; output CV about 1.0) and "chat" (the six short-answer
families weighted 8:1, the way chat traffic is mostly short questions; output CV about 1.5). Lengths x0.15 as in the other
sweeps (at least 4 tokens), the recorded iteration-time model of this machine.

Run:  .venv/bin/python benchmarks/scheduling_predicted.py [--requests 400] [--seeds 2]
          [--batches 4,8,32] [--loads 0.5,0.9,0.95] [--cvs 1,4,8] [--mixes uniform,chat] [--classes 4]
          [--output rows.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_sweep import DEFAULT_TIME_MODEL, LENGTH_SCALE, capacity  # noqa: E402
from scheduling_sweep_bursty import Row  # noqa: E402

from elastic_llm.scheduling import FCFS, BatchLimits, RequestScheduler, WorkloadItem  # noqa: E402
from elastic_llm.scheduling.las_adaptive import AdaptiveLAS, AdaptiveLASConfig  # noqa: E402
from elastic_llm.scheduling.las_predicted import PredictedLAS, PredictedLASConfig  # noqa: E402
from elastic_llm.scheduling.length_predictor import PromptLengthPredictor  # noqa: E402
from elastic_llm.scheduling.prompt_sample import (  # noqa: E402
    PromptSampleRow,
    fit_length_predictor,
    load_prompt_sample,
    prompt_workload,
    split_prompt_sample,
)
from elastic_llm.sim import ShortestRemainingFirst, simulate  # noqa: E402
from elastic_llm.sim.ttft_floor import ttft_p99_floor  # noqa: E402

POLICIES = ("fcfs", "las-adaptive", "las-predicted-rank", "las-predicted", "las-predicted-lane",
            "las-predicted-perfect", "oracle")
#: "las-predicted-lane": the express lane held to this share of the batch (`express_batch_share`)
LANE_SHARE = 0.25
SHORT_FAMILIES = ("one-word", "yes-no", "arithmetic", "translate", "define", "haiku")
MIXES: dict[str, dict[str, float] | None] = {
    "uniform": None,
    "chat": {family: 8.0 if family in SHORT_FAMILIES else 1.0
             for family in {row.family for row in load_prompt_sample()}},
}


@dataclass(frozen=True)
class ClairvoyantClasses:
    """A `LengthClassifier` told the truth: one class per distinct output length of the workload,
    and each prompt in the class of the length it ends with (prompts repeat in a workload drawn
    with replacement, and a greedy answer to one prompt always has one length)."""

    class_lengths: tuple[tuple[int, ...], ...]
    class_of_prompt: dict[tuple[int, ...], int]

    @classmethod
    def of(cls, items: list[WorkloadItem]) -> ClairvoyantClasses:
        lengths = sorted({item.output_tokens for item in items})
        index = {n: k for k, n in enumerate(lengths)}
        return cls(tuple((n,) for n in lengths),
                   {tuple(item.prompt_token_ids): index[item.output_tokens] for item in items})

    def classify(self, prompt_token_ids: Sequence[int]) -> int:
        return self.class_of_prompt[tuple(prompt_token_ids)]


def scaled(rows: tuple[PromptSampleRow, ...]) -> tuple[PromptSampleRow, ...]:
    """The rows with output lengths at the sweep's scale (x0.15, at least 4 tokens)."""
    return tuple(replace(r, output_tokens=max(4, round(r.output_tokens * LENGTH_SCALE))) for r in rows)


def build(name: str, items: list[WorkloadItem], predictor: PromptLengthPredictor,
          prior: tuple[int, ...]) -> RequestScheduler:
    if name == "fcfs":
        return FCFS()
    if name == "oracle":
        return ShortestRemainingFirst({f"r{i}": item.output_tokens for i, item in enumerate(items)})
    if name == "las-adaptive":
        return AdaptiveLAS(AdaptiveLASConfig(prior_lengths=prior, learn_online=False))
    config = PredictedLASConfig(prior_lengths=prior, learn_online=False)
    if name == "las-predicted-rank":
        config = replace(config, express_mean_fraction=0.0)
    if name == "las-predicted-lane":
        config = replace(config, express_batch_share=LANE_SHARE)
    if name == "las-predicted-perfect":
        return PredictedLAS(ClairvoyantClasses.of(items), config)
    return PredictedLAS(predictor, config)


def predictor_quality(seeds: int, classes: int = 4) -> list[dict[str, object]]:
    """Per split: held-out Spearman of the predicted and true lengths, and each class's mean."""
    report = []
    for seed in range(seeds):
        train, test = split_prompt_sample(scaled(load_prompt_sample()), seed=seed)
        predictor = fit_length_predictor(train, classes=classes, seed=seed)
        predicted = [predictor.predict_log_length(r.prompt_token_ids) for r in test]
        truth = [r.output_tokens for r in test]
        labels = [predictor.classify(r.prompt_token_ids) for r in test]
        report.append({
            "seed": seed,
            "train_rows": len(train), "test_rows": len(test),
            "cross_fit_spearman": round(predictor.holdout_spearman, 3),
            "test_spearman": round(float(spearmanr(predicted, truth).statistic), 3),
            "test_class_mean_tokens": [round(float(np.mean([t for t, c in zip(truth, labels) if c == k])), 1)
                                       if k in labels else None for k in range(predictor.classes)],
            "train_class_mean_tokens": [round(float(np.mean(c)), 1) for c in predictor.class_lengths],
        })
    return report


def point(mix: str, batch: int, load: float, cv: float, args: argparse.Namespace) -> Row:
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    stats: dict[str, list[tuple[float, float, float]]] = {name: [] for name in POLICIES}
    outputs: list[int] = []
    floors: list[float] = []
    for seed in range(args.seeds):
        train, test = split_prompt_sample(scaled(load_prompt_sample()), seed=seed)
        predictor = fit_length_predictor(train, classes=args.classes, seed=seed)
        prior = tuple(r.output_tokens for r in train)
        base = prompt_workload(test, args.requests, 1.0, seed=seed, family_weights=MIXES[mix])
        rate = load * capacity([(i.prompt_tokens, i.output_tokens) for i in base], DEFAULT_TIME_MODEL, limits)
        items = list(prompt_workload(test, args.requests, rate, cv=cv, seed=seed, family_weights=MIXES[mix]))
        outputs += [i.output_tokens for i in items]
        floors.append(ttft_p99_floor(items, DEFAULT_TIME_MODEL, limits.max_batch_tokens))
        for name in POLICIES:
            timings = simulate(build(name, items, predictor, prior), items, DEFAULT_TIME_MODEL, limits)
            jct = [t.completion_time_s for t in timings]
            ttft = [t.time_to_first_token_s for t in timings]
            stats[name].append((float(np.mean(jct)), float(np.percentile(jct, 99)), float(np.percentile(ttft, 99))))
    mean = {k: float(np.mean([m for m, _, _ in v])) for k, v in stats.items()}
    p99 = {k: float(np.mean([p for _, p, _ in v])) for k, v in stats.items()}
    ttft = {k: float(np.mean([t for _, _, t in v])) for k, v in stats.items()}
    others = [k for k in POLICIES if k != "fcfs"]
    return Row(mix, round(float(np.std(outputs) / np.mean(outputs)), 2), batch, load, cv, round(mean["fcfs"], 2),
               round(p99["fcfs"], 2), round(ttft["fcfs"], 3), {k: round(mean["fcfs"] / mean[k], 3) for k in others},
               {k: round(p99[k] / p99["fcfs"], 3) for k in others},
               {k: round(ttft["fcfs"] / max(ttft[k], 1e-9), 2) for k in others},
               {k: round(v, 3) for k, v in ttft.items()}, round(float(np.mean(floors)), 3))


def check_targets(rows: list[Row], policy: str) -> dict[str, object]:
    """Issue 20's targets for `policy` on these rows (the bursty ones: CV >= 4, output CV >= 1.5, 90%
    load, batch <= 8; queues form where FCFS's TTFT P99 is above 3 full decode iterations, as in
    `scheduling_sweep_bursty`)."""
    bursty = [r for r in rows if r.arrival_cv >= 4 and r.load == 0.9 and r.batch <= 8 and r.output_cv >= 1.5]
    queued = [r for r in rows if r.fcfs_ttft_p99_s > 3 * DEFAULT_TIME_MODEL(r.batch, r.batch)]
    return {
        "policy": policy,
        "mean_misses_3pct": sum(r.mean_gain[policy] < 0.97 for r in rows),
        "worst_mean_gain": min(r.mean_gain[policy] for r in rows),
        "p99_misses_20pct": sum(r.p99_ratio[policy] > 1.2 for r in rows),
        "worst_p99_ratio": max(r.p99_ratio[policy] for r in rows),
        "bursty_rows": len(bursty),
        "bursty_at_1_5x": sum(r.mean_gain[policy] >= 1.5 for r in bursty),
        "bursty_gains": [r.mean_gain[policy] for r in bursty],
        "queued_rows": len(queued),
        "ttft_5x_misses": sum(r.ttft_p99_gain[policy] < 5 for r in queued),
        # misses where even the floor for any schedule (`ttft_p99_floor`) leaves under 5x
        "ttft_out_of_reach": sum(r.ttft_p99_gain[policy] < 5 for r in queued if r.fcfs_ttft_p99_s < 5 * r.ttft_floor_s),
        "rows": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batches", default="4,8,32")
    parser.add_argument("--loads", default="0.5,0.9,0.95")
    parser.add_argument("--cvs", default="1,4,8")
    parser.add_argument("--mixes", default="uniform,chat")
    parser.add_argument("--classes", type=int, default=4, help="the predictor's length classes (default 4)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    mixes = args.mixes.split(",")
    unknown = set(mixes) - set(MIXES)
    if unknown:
        parser.error(f"unknown mix {sorted(unknown)}; choose from {list(MIXES)}")
    quality = predictor_quality(args.seeds, args.classes)
    for entry in quality:
        print(f"[predictor] {entry}", flush=True)
    grid = list(itertools.product(mixes, [int(b) for b in args.batches.split(",")],
                                  [float(x) for x in args.loads.split(",")], [float(c) for c in args.cvs.split(",")]))
    rows: list[Row] = []
    started = time.perf_counter()
    for index, (mix, batch, load, cv) in enumerate(grid, 1):
        row = point(mix, batch, load, cv, args)
        rows.append(row)
        cells = "  ".join(f"{k}: {row.mean_gain[k]:.2f}x/{row.p99_ratio[k]:.2f}/{row.ttft_p99_gain[k]:.1f}x"
                          for k in POLICIES if k != "fcfs")
        print(f"[{index}/{len(grid)} {time.perf_counter() - started:.0f}s] {row.dataset} cv_out {row.output_cv} b{batch} "
              f"load {load} cv {cv}: {cells}", flush=True)
    targets = [check_targets(rows, p) for p in POLICIES[1:]]
    for entry in targets:
        print(f"[targets] {entry}")
    if args.output:
        args.output.write_text(json.dumps({"command": " ".join(sys.argv), "predictor": quality, "targets": targets,
                                           "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
