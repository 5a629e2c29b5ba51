"""Does the live engine confirm the simulator's las-guard (or las-adaptive) / FCFS ratios? Two settings, run once.

For each setting (dataset, batch, arrival CV, load): the same requests (lengths from the bundled
sample x `--length-scale`, outputs capped at `--max-output`, Gamma arrivals at `load` x the
simulated capacity) are run

1. on the live engine (SmolLM2-135M-Instruct, fp32, `--threads` torch threads) in real time, the
   arrival rate set from a quick calibration (prefill over length, decode at the full batch), and
2. through the simulator (`elastic_llm.sim.simulate`) on the same arrivals, with an iteration-time
   model fitted (non-negative least squares) to every iteration the two live runs executed,

each under FCFS and under `--policy` ("las-guard" or "las-adaptive", its defaults; Gittins prior:
the same scaled, capped sample; the result keys say "las" for either). The datasets "prompts" and
"prompts-chat" serve the bundled prompt sample's real prompts (held-out half; `PROMPT_DATASETS`),
which "las-predicted" needs: its predictor is fitted on the other half. Their lengths are always
x0.15 (`scheduling_predicted.scaled`; `--length-scale` applies to the other datasets only), and
their live engine runs without a prefix cache, because the chat template gives every prompt the
same prefix and the simulator computes every prompt token. Reported:
mean and P99 JCT and P99 TTFT ratios (FCFS / las-guard for mean and TTFT, las-guard / FCFS for P99),
simulated next to live, and whether las-guard produced FCFS's greedy tokens.

Run:  .venv/bin/python benchmarks/scheduling_live_check.py [--settings "lognormal-cv3,4,4,0.9;sharegpt,4,4,0.9"]
          [--policy las-guard|las-adaptive|las-predicted] [--requests 36] [--length-scale 0.15] [--max-output 160]
          [--threads 1] [--repeats 1] [--output r.json]
Bounded: `--requests` requests per run, 2 x `--repeats` live runs per setting (FCFS and the policy
interleaved, so a drift in the machine's load hits both alike; their JCTs are pooled), each run also
stopped by `--limit-s`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scheduling_predicted import MIXES  # noqa: E402
from scheduling_predicted import scaled as scaled_prompt_rows  # noqa: E402
from scheduling_sweep import capacity, decode_step, fit_prefill  # noqa: E402

from elastic_llm import LLMEngine, SamplingParams  # noqa: E402
from elastic_llm.engine.replay import ReplayClock, TimedRequest, replay  # noqa: E402
from elastic_llm.model.loader import LoadedModel, load_model  # noqa: E402
from elastic_llm.scheduling import (  # noqa: E402
    FCFS,
    BatchLimits,
    IterationOutcome,
    LASConfig,
    RequestScheduler,
    SchedulerOutput,
    WorkloadItem,
    make_scheduler,
    make_workload,
)
from elastic_llm.scheduling.base import DelegatingScheduler  # noqa: E402
from elastic_llm.scheduling.prompt_sample import (  # noqa: E402
    PromptSampleRow,
    fit_length_predictor,
    load_prompt_sample,
    prompt_workload,
    split_prompt_sample,
)
from elastic_llm.scheduling.workloads import DATASETS, load_length_sample  # noqa: E402
from elastic_llm.sim import IterationTimeModel, simulate  # noqa: E402


@dataclass(frozen=True)
class Ratios:
    mean_gain: float  #: FCFS mean JCT / las-guard's
    p99_ratio: float  #: las-guard P99 JCT / FCFS's
    ttft_p99_gain: float  #: FCFS P99 TTFT / las-guard's
    fcfs_mean_s: float
    las_mean_s: float
    fcfs_ttft_p99_s: float = 0.0
    las_ttft_p99_s: float = 0.0
    fcfs_ttft_p50_s: float = 0.0
    las_ttft_p50_s: float = 0.0


@dataclass(frozen=True)
class SettingResult:
    dataset: str
    batch: int
    arrival_cv: float
    load: float
    rate_req_s: float
    simulated: Ratios
    live: Ratios
    same_tokens_as_fcfs: bool  #: every live run of either policy gave FCFS's first run's tokens
    live_wall_s: float
    #: per policy, simulated and live: iterations, preemptions, tokens computed, makespan (s)
    counters: dict[str, dict[str, float]]
    refitted_time_model: dict[str, float]  #: the simulator's model, fitted to the live iterations
    #: per policy, every live iteration (all runs): [requests, tokens computed, seconds]
    live_iterations: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)


def fit_time_model(model: LoadedModel, limits: BatchLimits) -> IterationTimeModel:
    """Prefill over length at batch 1 and decode at the full batch, measured on the live engine."""
    engine = LLMEngine(model, limits=limits)
    engine.generate([[101, 102, 103]], SamplingParams(max_new_tokens=2))
    prefill = fit_prefill(engine, (16, 64, 128), repeats=2)
    batch = limits.max_batch_size
    step = decode_step(engine, batch, new_tokens=16)
    per_request = max(0.0, (step - batch * prefill.per_token_s - prefill.intercept_s) / max(1, batch - 1))
    fixed = max(0.0, prefill.intercept_s - per_request)
    return IterationTimeModel(fixed, per_request, prefill.per_token_s)


class IterationRecorder(DelegatingScheduler):
    """Delegates to `inner`; records (batch size, tokens, seconds) of every live iteration, and
    how many of its requests resumed (ran before, not in the previous iteration)."""

    def __init__(self, inner: RequestScheduler) -> None:
        super().__init__(inner)
        self.iterations: list[tuple[int, int, float]] = []
        self.resumed: list[int] = []  #: per recorded iteration
        self._shape = (0, 0)
        self._previous: set[str] = set()
        self._ran: set[str] = set()
        self._resumed = 0

    def schedule(self, now: float, limits: BatchLimits) -> SchedulerOutput:
        decision = self.inner.schedule(now, limits)
        batch = {w.request_id for w in decision.scheduled}
        self._shape = (len(decision.scheduled), decision.num_tokens)
        self._resumed = len((batch - self._previous) & self._ran)
        self._previous, self._ran = batch, self._ran | batch
        return decision

    def update(self, outcome: IterationOutcome) -> None:
        if self._shape[0]:
            self.iterations.append((*self._shape, outcome.duration))
            self.resumed.append(self._resumed)
        self.inner.update(outcome)


def fit_to_iterations(iterations: list[tuple[int, int, float]]) -> IterationTimeModel:
    """Least squares `seconds = fixed + per_request * batch + per_token * tokens`, terms >= 0."""
    data = np.asarray(iterations, dtype=float)
    design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
    terms = scipy.optimize.nnls(design, data[:, 2])[0]
    return IterationTimeModel(*(float(t) for t in terms))


#: the bundled prompt sample as a setting's dataset: "prompts" (every family alike) or "prompts-chat"
#: (`scheduling_predicted.MIXES["chat"]`); the held-out half of split `--seed` is served, the other
#: half trains "las-predicted"'s predictor and is every policy's Gittins prior
PROMPT_DATASETS = {"prompts": "uniform", "prompts-chat": "chat"}


def prompt_split(args: argparse.Namespace) -> tuple[tuple[PromptSampleRow, ...], tuple[PromptSampleRow, ...]]:
    """(train, test) of the prompt sample, lengths x0.15 as `scheduling_predicted` runs them."""
    return split_prompt_sample(scaled_prompt_rows(load_prompt_sample()), seed=args.seed)


def scaled(dataset: str, args: argparse.Namespace) -> tuple[int, ...]:
    """The dataset's output lengths as this benchmark runs them (the Gittins prior)."""
    if dataset in PROMPT_DATASETS:
        return tuple(min(args.max_output, r.output_tokens) for r in prompt_split(args)[0])
    return tuple(min(args.max_output, max(4, round(o * args.length_scale)))
                 for _, o in load_length_sample(dataset))  # type: ignore[arg-type]


def policies(dataset: str, args: argparse.Namespace) -> dict[str, RequestScheduler]:
    config = LASConfig(prior_lengths=scaled(dataset, args), learn_online=False)
    if args.policy != "las-predicted":
        return {"fcfs": FCFS(), "las-guard": make_scheduler(args.policy, las=config)}
    if dataset not in PROMPT_DATASETS:
        raise ValueError(f"las-predicted needs a prompt dataset ({sorted(PROMPT_DATASETS)}), not {dataset!r}")
    predictor = fit_length_predictor(prompt_split(args)[0], seed=args.seed)
    return {"fcfs": FCFS(), "las-guard": make_scheduler("las-predicted", las=config, length_predictor=predictor)}


def setting_items(dataset: str, rate: float, cv: float, args: argparse.Namespace) -> list[WorkloadItem]:
    """The setting's requests at `rate` (arrival CV `cv`); the same lengths and prompts at every rate."""
    if dataset in PROMPT_DATASETS:
        test = prompt_split(args)[1]
        drawn = prompt_workload(test, args.requests, rate, cv=cv, seed=args.seed,
                                family_weights=MIXES[PROMPT_DATASETS[dataset]])
        return [WorkloadItem(i.arrival_s, i.prompt_tokens, min(args.max_output, i.output_tokens), i.prompt_token_ids)
                for i in drawn]
    drawn = make_workload(args.requests, rate, dataset, cv=cv, seed=args.seed)  # type: ignore[arg-type]
    return [WorkloadItem(i.arrival_s, max(4, round(i.prompt_tokens * args.length_scale)),
                         min(args.max_output, max(4, round(i.output_tokens * args.length_scale)))) for i in drawn]


def ratios(results: dict[str, tuple[list[float], list[float]]]) -> Ratios:
    (fj, ft), (lj, lt) = results["fcfs"], results["las-guard"]
    return Ratios(float(np.mean(fj) / np.mean(lj)), float(np.percentile(lj, 99) / np.percentile(fj, 99)),
                  float(np.percentile(ft, 99) / max(np.percentile(lt, 99), 1e-9)),
                  float(np.mean(fj)), float(np.mean(lj)), float(np.percentile(ft, 99)),
                  float(np.percentile(lt, 99)), float(np.percentile(ft, 50)), float(np.percentile(lt, 50)))


def run_setting(model: LoadedModel, time_model: IterationTimeModel, spec: str,
                args: argparse.Namespace) -> SettingResult:
    dataset, batch_s, cv_s, load_s = spec.split(",")
    batch, cv, load = int(batch_s), float(cv_s), float(load_s)
    limits = BatchLimits(max_batch_size=batch, max_batch_tokens=512)
    rows = [(i.prompt_tokens, i.output_tokens) for i in setting_items(dataset, 1.0, cv, args)]
    rate = load * capacity(rows, time_model, limits)
    items = setting_items(dataset, rate, cv, args)
    counters: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(args.seed)
    requests = []
    for i, item in enumerate(items):
        prompt = list(item.prompt_token_ids) or torch.randint(
            100, model.spec.vocab_size, (item.prompt_tokens,), generator=generator).tolist()
        requests.append(TimedRequest(f"q{i}", item.arrival_s, tuple(prompt),
                                     SamplingParams(max_new_tokens=item.output_tokens, ignore_eos=True)))
    live: dict[str, tuple[list[float], list[float]]] = {}
    tokens: dict[str, list[dict[str, tuple[int, ...]]]] = {}
    observed: list[tuple[int, int, float]] = []
    by_policy: dict[str, list[tuple[int, int, float]]] = {}
    resumed: dict[str, list[int]] = {}
    started = time.perf_counter()
    for repeat in range(args.repeats):  # interleaved: FCFS, the policy, FCFS, ... (load drifts alike)
        for name, scheduler in policies(dataset, args).items():
            deadline = time.perf_counter() + args.limit_s

            def on_progress(done: int, total: int) -> None:
                if time.perf_counter() > deadline:  # noqa: B023
                    raise TimeoutError(f"live run over --limit-s {args.limit_s} s ({done}/{total} done)")

            engines: list[LLMEngine] = []
            recorder = IterationRecorder(scheduler)

            def make_engine(clock: ReplayClock, s: RequestScheduler = recorder) -> LLMEngine:
                # the prompt sample's chat template gives every prompt one prefix; the simulator
                # computes every prompt token, so the live engine must too (no prefix cache)
                cache = 0 if dataset in PROMPT_DATASETS else None
                engines.append(LLMEngine(model, scheduler=s, limits=limits, clock=clock,  # noqa: B023
                                         prefix_cache_bytes=cache))
                return engines[-1]  # noqa: B023

            timings = replay(make_engine, requests, on_progress)
            stats = engines[0].stats()
            makespan = max(t.finish_s for t in timings)
            counters[f"live {name} #{repeat}"] = {
                "iterations": stats.iterations, "preemptions": stats.preemptions,
                "tokens_computed": stats.tokens_computed, "makespan_s": makespan,
                "mean_iteration_ms": 1000 * sum(i[2] for i in recorder.iterations) / max(1, len(recorder.iterations)),
                "mean_jct_s": float(np.mean([t.completion_time_s for t in timings]))}
            observed += recorder.iterations
            by_policy.setdefault(name, []).extend(recorder.iterations)
            resumed.setdefault(name, []).extend(recorder.resumed)
            jct, ttft = live.setdefault(name, ([], []))
            jct += [t.completion_time_s for t in timings]
            ttft += [t.time_to_first_token_s for t in timings]
            tokens.setdefault(name, []).append({t.request_id: t.token_ids for t in timings})
            print(f"  {spec} {name} #{repeat}: live JCT mean {counters[f'live {name} #{repeat}']['mean_jct_s']:.2f} s, "
                  f"{stats.iterations} iterations, makespan {makespan:.1f} s", flush=True)
    refit = fit_to_iterations(observed)
    print(f"  {spec}: iteration-time model refitted to {len(observed)} live iterations: {refit}", flush=True)
    for name, iterations in by_policy.items():  # what the pooled model misses, per policy
        data = np.asarray(iterations, dtype=float)
        predicted = refit.fixed_s + refit.per_request_s * data[:, 0] + refit.per_token_s * data[:, 1]
        residual, back = 1000 * (data[:, 2] - predicted), np.asarray(resumed[name]) > 0
        prefill = data[:, 1] > data[:, 0]  # more tokens than requests: a prompt is computed
        counters[f"live {name}"] = {"mean_residual_ms": float(np.mean(residual)),
                                    "iterations_with_a_resumed_request": int(back.sum()),
                                    "mean_residual_ms_resumed": float(np.mean(residual[back])) if back.any() else 0.0,
                                    "mean_residual_ms_not_resumed": float(np.mean(residual[~back])) if (~back).any() else 0.0,
                                    "iterations_with_a_prefill": int(prefill.sum()),
                                    "mean_residual_ms_prefill": float(np.mean(residual[prefill])) if prefill.any() else 0.0,
                                    "mean_residual_ms_decode_only": float(np.mean(residual[~prefill])) if (~prefill).any() else 0.0,
                                    "mean_relative_residual_prefill": float(np.mean(residual[prefill] / (1000 * predicted[prefill]))) if prefill.any() else 0.0,
                                    "mean_batch": float(np.mean(data[:, 0])),
                                    "mean_tokens": float(np.mean(data[:, 1])),
                                    **{f"own_fit_{k}": v for k, v in asdict(fit_to_iterations(iterations)).items()}}
    simulated = {}
    for name, scheduler in policies(dataset, args).items():
        sim_timings = simulate(scheduler, items, refit, limits)
        simulated[name] = ([t.completion_time_s for t in sim_timings], [t.time_to_first_token_s for t in sim_timings])
        counters[f"sim {name}"] = {"preemptions": sum(t.preemptions for t in sim_timings),
                                   "makespan_s": max(t.finish_s for t in sim_timings)}
    return SettingResult(dataset, batch, cv, load, rate, ratios(simulated), ratios(live),
                         all(t == tokens["fcfs"][0] for ts in tokens.values() for t in ts),
                         time.perf_counter() - started, counters,
                         asdict(refit), by_policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="lognormal-cv3,4,4,0.9;sharegpt,4,4,0.9",
                        help="DATASET,BATCH,ARRIVAL_CV,LOAD;...")
    parser.add_argument("--policy", default="las-guard", choices=("las-guard", "las-adaptive", "las-predicted"),
                        help="the policy run against FCFS (reported under the key 'las-guard')")
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--length-scale", type=float, default=0.15)
    parser.add_argument("--max-output", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="live runs per policy, interleaved (JCTs pooled over them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-s", type=float, default=600.0, help="stop a live run after this long")
    parser.add_argument("--output")
    args = parser.parse_args()
    specs = [s for s in args.settings.split(";") if s]
    for spec in specs:
        parts = spec.split(",")
        if len(parts) != 4 or parts[0] not in (*DATASETS, *PROMPT_DATASETS):
            parser.error(f"bad setting {spec!r}: DATASET,BATCH,ARRIVAL_CV,LOAD with DATASET in "
                         f"{(*DATASETS, *PROMPT_DATASETS)}")
        if args.policy == "las-predicted" and parts[0] not in PROMPT_DATASETS:
            parser.error(f"--policy las-predicted needs a prompt dataset {tuple(PROMPT_DATASETS)}, not {parts[0]!r}")
    if args.requests < 1 or args.max_output < 4 or not args.length_scale > 0 or args.repeats < 1:
        parser.error("need --requests >= 1, --max-output >= 4, --length-scale > 0, --repeats >= 1")
    torch.set_num_threads(args.threads)
    model = load_model()
    limits = BatchLimits(max_batch_size=max(int(s.split(",")[1]) for s in specs), max_batch_tokens=512)
    time_model = fit_time_model(model, limits)
    print(f"time model fitted here: {time_model}", flush=True)
    results = []
    for spec in specs:
        result = run_setting(model, time_model, spec, args)
        results.append(result)
        print(f"{spec}: simulated {asdict(result.simulated)}\n    live {asdict(result.live)}\n"
              f"    same tokens {result.same_tokens_as_fcfs}, live wall {result.live_wall_s:.0f} s\n"
              f"    counters {result.counters}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "time_model": asdict(time_model),
                                                 "results": [asdict(r) for r in results]}, indent=1),
                                     encoding="utf-8")


if __name__ == "__main__":
    main()
