"""Why does skip-join lose to FCFS on bursty heavy-tailed load? Instrumented simulator runs.

Runs FCFS, skip-join MLFQ and the named policies given through the simulator on one setting and
records, per policy: iterations, mean batch and tokens per iteration, preemptions per request,
seconds of service and of waiting per MLFQ level, what each burst of arrivals does to the running
batch (requests it preempts), starvation promotions, and how alpha compares with FCFS's mean JCT.
The scheduler is wrapped (its decisions are untouched) to read its queue after every iteration.

Run:  .venv/bin/python benchmarks/scheduling_diagnosis.py [--dataset pareto-cv1.5] [--batch 16]
          [--load 0.9] [--cv 4] [--alpha-steps 200] [--requests 400] [--seeds 3] [--output d.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_sweep import DEFAULT_TIME_MODEL, LENGTH_SCALE, capacity  # noqa: E402

from elastic_llm.scheduling import (  # noqa: E402
    FCFS,
    BatchLimits,
    IterationOutcome,
    LinearPrefillPredictor,
    MLFQConfig,
    RequestScheduler,
    SchedulerOutput,
    SkipJoinMLFQ,
    WorkloadItem,
    make_scheduler,
    make_workload,
)
from elastic_llm.scheduling.base import DelegatingScheduler  # noqa: E402
from elastic_llm.scheduling.las import LASConfig  # noqa: E402
from elastic_llm.scheduling.workloads import load_length_sample  # noqa: E402
from elastic_llm.sim import simulate  # noqa: E402

PREFILL = LinearPrefillPredictor(0.053, 0.00292)


@dataclass(frozen=True)
class Diagnosis:
    policy: str
    mean_jct_s: float
    p99_jct_s: float
    p99_ttft_s: float
    iterations: int
    mean_batch: float
    mean_tokens_per_iteration: float
    mean_iteration_s: float
    preemptions_per_request: float
    max_preemptions: int
    preemptions_per_request_top10pct_longest: float
    promotions: int
    service_s_by_level: dict[int, float]
    wait_s_by_level: dict[int, float]
    preempted_per_iteration_after_burst: float  #: iterations with >= batch/2 arrivals since the last
    preempted_per_iteration_otherwise: float
    alpha_s: float
    fcfs_mean_jct_s: float


class Recorder(DelegatingScheduler):
    """Delegates every call to `inner`; notes arrivals, preemptions, levels and promotions."""

    def __init__(self, inner: RequestScheduler) -> None:
        super().__init__(inner)
        self.arrived_since = 0
        self.bursts: list[tuple[int, int]] = []  # (arrivals since last batch, preempted)
        self.service: collections.Counter[int] = collections.Counter()
        self.wait: collections.Counter[int] = collections.Counter()
        self.promotions = 0
        self.batches: list[tuple[int, int, float]] = []

    def add_request(self, request_id: str, num_tokens_to_compute: int, now: float) -> None:
        self.arrived_since += 1
        self.inner.add_request(request_id, num_tokens_to_compute, now)

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        before = self._levels()
        decision = self.inner.schedule(now, limits)
        after = self._levels()
        self.promotions += sum(1 for rid, lv in after.items() if lv == 0 and before.get(rid, 0) > 0)
        self.bursts.append((self.arrived_since, len(decision.preempted)))
        self.arrived_since = 0
        self._levels_at_schedule = after
        self._chosen = {w.request_id for w in decision.scheduled}
        self._tokens = decision.num_tokens
        return decision

    def update(self, outcome: IterationOutcome) -> None:
        for rid, level in self._levels_at_schedule.items():
            (self.service if rid in self._chosen else self.wait)[level] += outcome.duration
        self.batches.append((len(self._chosen), self._tokens, outcome.duration))
        self.inner.update(outcome)

    def _levels(self) -> dict[str, int]:
        queue = getattr(self.inner, "queue", None)
        if queue is None:
            return {}
        return {state.request_id: state.level for state in queue()}


def workload(args: argparse.Namespace, seed: int, limits: BatchLimits) -> list[WorkloadItem]:
    base = make_workload(args.requests, 1.0, args.dataset, seed=seed)
    rows = [(max(4, round(i.prompt_tokens * LENGTH_SCALE)), max(4, round(i.output_tokens * LENGTH_SCALE)))
            for i in base]
    rate = args.load * capacity(rows, DEFAULT_TIME_MODEL, limits)
    arrivals = make_workload(args.requests, rate, args.dataset, cv=args.cv, seed=seed)
    return [WorkloadItem(a.arrival_s, p, o) for a, (p, o) in zip(arrivals, rows)]


def build(name: str, step: float, alpha_s: float, dataset: str) -> RequestScheduler:
    if name == "fcfs":
        return FCFS()
    config = MLFQConfig(base_quantum_s=step, starvation_alpha_s=alpha_s)
    if name == "skip-join":
        return SkipJoinMLFQ(config, PREFILL)
    if name == "mlfq":
        return make_scheduler("mlfq", config)
    if name == "las-guard":  # its Gittins prior: the bundled sample at the benchmark's scale
        prior = tuple(max(4, round(o * LENGTH_SCALE)) for _, o in load_length_sample(dataset))  # type: ignore[arg-type]
        return make_scheduler(name, las=LASConfig(prior_lengths=prior, learn_online=False))
    return make_scheduler(name)


def diagnose(name: str, args: argparse.Namespace, fcfs_mean: float) -> Diagnosis:
    limits = BatchLimits(max_batch_size=args.batch, max_batch_tokens=512)
    step = DEFAULT_TIME_MODEL(args.batch, args.batch)
    alpha_s = args.alpha_steps * step
    jcts, ttfts, preempt, longest_preempt = [], [], [], []
    recorders = []
    for seed in range(args.seeds):
        items = workload(args, seed, limits)
        recorder = Recorder(build(name, step, alpha_s, args.dataset))
        timings = simulate(recorder, items, DEFAULT_TIME_MODEL, limits)
        recorders.append(recorder)
        jcts += [t.completion_time_s for t in timings]
        ttfts += [t.time_to_first_token_s for t in timings]
        preempt += [t.preemptions for t in timings]
        cut = np.percentile([t.output_tokens for t in timings], 90)
        longest_preempt += [t.preemptions for t in timings if t.output_tokens >= cut]
    batches = [b for r in recorders for b in r.batches]
    bursts = [b for r in recorders for b in r.bursts]
    after = [p for a, p in bursts if a >= args.batch // 2]
    other = [p for a, p in bursts if a < args.batch // 2]
    service: collections.Counter[int] = sum((r.service for r in recorders), collections.Counter())
    wait: collections.Counter[int] = sum((r.wait for r in recorders), collections.Counter())
    return Diagnosis(
        policy=name, mean_jct_s=float(np.mean(jcts)), p99_jct_s=float(np.percentile(jcts, 99)),
        p99_ttft_s=float(np.percentile(ttfts, 99)), iterations=len(batches) // args.seeds,
        mean_batch=float(np.mean([b for b, _, _ in batches])),
        mean_tokens_per_iteration=float(np.mean([t for _, t, _ in batches])),
        mean_iteration_s=float(np.mean([d for _, _, d in batches])),
        preemptions_per_request=float(np.mean(preempt)), max_preemptions=int(max(preempt)),
        preemptions_per_request_top10pct_longest=float(np.mean(longest_preempt)),
        promotions=sum(r.promotions for r in recorders) // args.seeds,
        service_s_by_level={k: round(v / args.seeds, 2) for k, v in sorted(service.items())},
        wait_s_by_level={k: round(v / args.seeds, 2) for k, v in sorted(wait.items())},
        preempted_per_iteration_after_burst=float(np.mean(after)) if after else 0.0,
        preempted_per_iteration_otherwise=float(np.mean(other)) if other else 0.0,
        alpha_s=alpha_s, fcfs_mean_jct_s=fcfs_mean,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pareto-cv1.5")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--cv", type=float, default=4.0)
    parser.add_argument("--alpha-steps", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", default="fcfs,skip-join,mlfq,las-guard")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.batch < 1 or args.requests < 1 or args.seeds < 1 or not 0 < args.load < 1:
        parser.error("need batch, requests, seeds >= 1 and 0 < load < 1")
    results = []
    fcfs_mean = float("nan")
    for name in args.policies.split(","):
        row = diagnose(name, args, fcfs_mean)
        if name == "fcfs":
            fcfs_mean = row.mean_jct_s
        results.append(row)
        print(json.dumps(asdict(row)), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": [asdict(r) for r in results]},
                                                indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
