"""FCFS vs (skip-join) MLFQ, with and without KV swapping, on the live engine, side by side.

Same model (SmolLM2-135M-Instruct, fp32), same requests (ShareGPT-shaped lengths, scaled down so a
2-core CPU can run them), same Poisson arrivals for every policy at each load:

1. calibrate on this machine: one decode iteration at the full batch (-> MLFQ base quantum),
   prefill time over prompt length (-> skip-join's predictor), and the engine's capacity in
   requests/s (FCFS with every request queued at t=0, counted while the batch is full);
2. at each load (default 50% and 90% of that capacity) replay the workload in real time under
   FCFS, plain MLFQ, skip-join MLFQ, skip-join + proactive swap and skip-join + recompute. The
   device KV budget of the last two is FCFS's own peak KV at that load (the memory FCFS needed),
   so MLFQ's many half-finished requests must swap (or be recomputed) to stay within it.

Reported per policy: mean and P99 job completion time (JCT) and time to first token (TTFT), mean
per-token latency, preemptions, bytes swapped, seconds the engine was blocked on swaps, tokens
recomputed; and whether every policy produced the same greedy tokens as FCFS.

Run:  .venv/bin/python benchmarks/scheduling_policies.py [--requests 48] [--loads 0.5,0.9]
          [--length-scale 0.25] [--max-batch 8] [--cv 1] [--threads 2] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.replay import ReplayClock, RequestTiming, TimedRequest, replay
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.scheduling import (
    BatchLimits,
    LinearPrefillPredictor,
    MLFQConfig,
    RequestScheduler,
    ResidencyConfig,
    make_scheduler,
    make_workload,
)


@dataclass(frozen=True)
class Calibration:
    decode_step_s: float  #: one decode iteration at the full batch
    predictor: LinearPrefillPredictor  #: prefill seconds over prompt tokens
    capacity_req_s: float  #: FCFS throughput while the batch is full, every request queued at t=0


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    load: float
    rate_req_s: float
    mean_jct_s: float
    p99_jct_s: float
    mean_ttft_s: float
    p99_ttft_s: float
    mean_per_token_s: float
    makespan_s: float
    preemptions: int
    peak_device_kv_mb: float
    kv_budget_mb: float | None
    swapped_mb: float
    swap_blocked_s: float
    tokens_recomputed: int
    same_tokens_as_fcfs: bool


def build_requests(args: argparse.Namespace, rate: float, vocab: int) -> list[TimedRequest]:
    """The workload at `rate`: identical lengths and prompts at every rate (same seed)."""
    items = make_workload(args.requests, rate, "sharegpt", cv=args.cv, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    requests = []
    for i, item in enumerate(items):
        prompt_len = max(4, round(item.prompt_tokens * args.length_scale))
        new_tokens = max(4, round(item.output_tokens * args.length_scale))
        prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
        requests.append(TimedRequest(f"q{i}", item.arrival_s, tuple(prompt),
                                     SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
    return requests


def calibrate(model: LoadedModel, args: argparse.Namespace, limits: BatchLimits) -> Calibration:
    """Measure decode step, prefill over length, and FCFS capacity on this machine."""
    engine = LLMEngine(model, limits=limits)
    engine.generate([[101, 102, 103]], SamplingParams(max_new_tokens=2))  # warm-up
    samples = []
    for length in (16, 64, 128, 256):
        runs = []
        for _ in range(3):  # the quickest of three: other load on the machine only adds time
            started = time.perf_counter()
            engine.generate([list(range(100, 100 + length))], SamplingParams(max_new_tokens=1))
            runs.append(time.perf_counter() - started)
        samples.append((length, min(runs)))
    predictor = LinearPrefillPredictor.fit(samples)
    for i in range(limits.max_batch_size):
        engine.add_request(f"d{i}", [100 + i] * 32, SamplingParams(max_new_tokens=24, ignore_eos=True))
    engine.step()  # prefill all
    steps = []
    while engine.has_unfinished():
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    burst = [TimedRequest(r.request_id, 0.0, r.prompt_token_ids, r.params)
             for r in build_requests(args, 1.0, model.spec.vocab_size)]
    timings = replay(lambda clock: LLMEngine(model, limits=limits, clock=clock), burst)
    # Saturated throughput: requests finished while the batch was still full (the drain at the
    # end, with fewer requests than the batch holds, would understate what the engine can do).
    finishes = sorted(t.finish_s for t in timings)
    full = max(1, len(finishes) - limits.max_batch_size)
    capacity = full / finishes[full - 1]
    return Calibration(statistics.median(steps), predictor, capacity)


def policies(cal: Calibration, args: argparse.Namespace) -> dict[str, Callable[[], RequestScheduler]]:
    """The schedulers compared (fresh instances per run), built by name (`make_scheduler`)."""
    config = MLFQConfig(base_quantum_s=cal.decode_step_s, starvation_alpha_s=args.alpha_steps * cal.decode_step_s)

    def named(name: str) -> Callable[[], RequestScheduler]:
        if name == "fcfs":
            return lambda: make_scheduler(name)
        return lambda: make_scheduler(name, config, cal.predictor if name == "skip-join" else None)

    return {"fcfs": named("fcfs"), "mlfq": named("mlfq"), "skip-join": named("skip-join"),
            "skip-join+swap": named("skip-join"), "skip-join+recompute": named("skip-join")}


def summarize(policy: str, load: float, rate: float, timings: list[RequestTiming], engine: LLMEngine,
              budget: int | None, reference: dict[str, tuple[int, ...]] | None) -> PolicyResult:
    """One row of the results table."""
    jct = [t.completion_time_s for t in timings]
    ttft = [t.time_to_first_token_s for t in timings]
    stats = engine.stats()
    tokens = {t.request_id: t.token_ids for t in timings}
    return PolicyResult(
        policy=policy, load=load, rate_req_s=rate,
        mean_jct_s=float(np.mean(jct)), p99_jct_s=float(np.percentile(jct, 99)),
        mean_ttft_s=float(np.mean(ttft)), p99_ttft_s=float(np.percentile(ttft, 99)),
        mean_per_token_s=float(np.mean([t.per_token_latency_s for t in timings])),
        makespan_s=max(t.finish_s for t in timings), preemptions=stats.preemptions,
        peak_device_kv_mb=stats.peak_device_kv_bytes / 2**20,
        kv_budget_mb=None if budget is None else budget / 2**20,
        swapped_mb=(stats.bytes_swapped_out + stats.bytes_swapped_in) / 2**20,
        swap_blocked_s=stats.swap_seconds, tokens_recomputed=stats.tokens_dropped,
        same_tokens_as_fcfs=reference is None or tokens == reference,
    )


def run_load(model: LoadedModel, cal: Calibration, args: argparse.Namespace, limits: BatchLimits,
             load: float) -> list[PolicyResult]:
    """Every policy on the same arrivals at `load` x capacity."""
    rate = load * cal.capacity_req_s
    requests = build_requests(args, rate, model.spec.vocab_size)
    results: list[PolicyResult] = []
    reference: dict[str, tuple[int, ...]] | None = None
    budget: int | None = None
    for name, new_scheduler in policies(cal, args).items():
        mode = name.partition("+")[2] or None
        residency = None
        if mode is not None:
            assert budget is not None
            residency = ResidencyConfig(device_budget_bytes=budget, mode=mode)  # type: ignore[arg-type]
        engines: list[LLMEngine] = []

        def make_engine(clock: ReplayClock) -> LLMEngine:
            engine = LLMEngine(model, scheduler=new_scheduler(), limits=limits,  # noqa: B023
                               residency=residency, clock=clock)  # noqa: B023
            engines.append(engine)  # noqa: B023
            return engine

        timings = replay(make_engine, requests)
        row = summarize(name, load, rate, timings, engines[0], residency and residency.device_budget_bytes,
                        reference)
        if name == "fcfs":
            reference = {t.request_id: t.token_ids for t in timings}
            longest = max(len(r.prompt_token_ids) + r.params.max_new_tokens for r in requests)
            per_token = engines[0].executor.kv_bytes_per_token
            budget = max(engines[0].stats().peak_device_kv_bytes, longest * per_token)
        results.append(row)
        print(f"  load {load:.0%} {name:>20}: JCT mean {row.mean_jct_s:6.2f} s P99 {row.p99_jct_s:6.2f} s | "
              f"TTFT mean {row.mean_ttft_s:6.2f} s P99 {row.p99_ttft_s:6.2f} s | per-token "
              f"{row.mean_per_token_s * 1000:6.1f} ms | preempt {row.preemptions:5d} | swapped "
              f"{row.swapped_mb:7.1f} MB, blocked {row.swap_blocked_s:5.2f} s | recomputed "
              f"{row.tokens_recomputed:5d} | same tokens {row.same_tokens_as_fcfs}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--loads", default="0.5,0.9", help="fractions of the measured capacity")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="multiply the ShareGPT-shaped prompt and output lengths by this")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--alpha-steps", type=float, default=200.0,
                        help="starvation promotion after this many decode iterations of waiting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cv", type=float, default=1.0,
                        help="coefficient of variation of inter-arrival gaps (1: Poisson, > 1: burstier Gamma)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    limits = BatchLimits(max_batch_size=args.max_batch, max_batch_tokens=512)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads", flush=True)
    cal = calibrate(model, args, limits)
    print(f"calibration: decode step {cal.decode_step_s * 1000:.1f} ms at batch {args.max_batch}, prefill "
          f"{cal.predictor.intercept_s * 1000:.1f} ms + {cal.predictor.per_token_s * 1000:.2f} ms/token, "
          f"capacity {cal.capacity_req_s:.3f} req/s", flush=True)
    results = []
    for load in (float(x) for x in args.loads.split(",")):
        results.extend(run_load(model, cal, args, limits, load))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"calibration": {"decode_step_s": cal.decode_step_s,
                                       "prefill": asdict(cal.predictor),
                                       "capacity_req_s": cal.capacity_req_s},
                       "args": vars(args), "results": [asdict(r) for r in results]}, handle, indent=2)


if __name__ == "__main__":
    main()
