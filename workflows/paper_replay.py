"""Reproduce SpotServe's GPT-20B evaluation in the fleet simulator, next to the published values.

The live control state machine (`FleetState`, unchanged) runs each policy over SpotServe's
availability traces (A_S, B_S, A_S+O, B_S+O) and arrivals; iterations are timed by the cost model
over SpotServe's measured T4 profiles (`elastic_llm.sim`). Prints average and P99 latency next to
the published values (ratio sim / paper), the policy order per trace, cost per token (the
artifact's formula, 1e-5 USD/token) and node-minutes; on-demand fleets of 3/4/6/8 instances;
SpotServe's four ablations; the 6.7B and 30B models at their rates; and the simulator's speed on
the 12-hour trace and on a synthetic 512-instance trace.

Run:  python workflows/paper_replay.py [--data ../shared/data/spotserve] [--sections all]
          [--batching static|continuous] [--scheduler fcfs|mlfq|skip-join|las-guard]
          [--storage-bandwidth 1.25e9] [--json results.json]
sections: paper, ondemand, ablations, models, fixed, speed, beyond (comma-separated) or all
(beyond: the capacity-aware policies against spotserve and SpotServe's published P99, on the four
traces and on the 12-hour trace)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from elastic_llm.model.spec import described_model
from elastic_llm.scheduling.factory import SCHEDULER_NAMES
from elastic_llm.sim import PaperSetting, SimResult, SimSettings, simulate_fleet
from elastic_llm.sim.traces import AvailabilityTrace, InstanceEvent, gamma_arrivals, synthetic_availability
from elastic_llm.sim_loaders import load_arrivals, load_availability, load_profile

TRACES = {"A_S": "trace_0304_real.txt", "B_S": "trace_0506_real.txt", "A_S+O": "trace_0304_ondemand.txt",
          "B_S+O": "trace_0506_ondemand.txt"}
POLICIES = ("reparallelization", "rerouting", "spotserve")
OUR_NAME = {"reparallelization": "reparallelize", "rerouting": "reroute", "spotserve": "spotserve"}
ABLATIONS = ("spotserve-no-adaptive", "spotserve-no-planner", "spotserve-no-arranger", "spotserve-no-mapper")
MODELS = {  # model: (profile, arrivals, required rate)
    "opt-6.7b": ("T4-4x_megatron_6.7B.json", "query6144_tpt1.5_cv6.txt", 2.0),
    "gpt-20b": ("T4-4x_megatron_h6144.json", "query_tpt0.35_cv6.txt", 0.4),
    "spotserve-30b": ("T4-4x_megatron_h7168.json", "query_tpt0.2_cv6.txt", 0.2),
}
BEYOND = ("beyond", "beyond-release-spot", "beyond-overprovision")
SECTIONS = ("paper", "ondemand", "ablations", "models", "fixed", "speed", "beyond")


def published(data: Path) -> dict[tuple[str, str], tuple[float, float]]:
    """(trace, policy) -> (average, P99) seconds, from the artifact's plotting values."""
    with open(data / "published_gpt20b.csv") as handle:
        return {(r["trace"], r["policy"]): (float(r["avg_latency_s"]), float(r["p99_latency_s"]))
                for r in csv.DictReader(handle)}


class Runner:
    """Loads the data once and runs simulations."""

    def __init__(self, data: Path, settings: SimSettings) -> None:
        self.data = data
        self.settings = settings
        self.results: list[dict[str, Any]] = []
        self.cpu_s = 0.0  #: CPU seconds of the latest run (the machine is shared: wall time varies)

    def run(self, section: str, label: str, policy: str, model: str, trace: AvailabilityTrace,
            arrivals: Any = None, setting: PaperSetting | None = None) -> tuple[SimResult, float]:
        profile_file, arrivals_file, rate = MODELS[model]
        profile = load_profile(self.data / "profiles" / profile_file, model=model)
        if arrivals is None:
            arrivals = [a for a in load_arrivals(self.data / "arrivals" / arrivals_file) if a.time < trace.end]
        started, cpu = time.perf_counter(), time.process_time()
        result = simulate_fleet(policy, described_model(model), profile, trace, arrivals,
                                replace(setting or PaperSetting(), required_rate=rate), self.settings)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        self.cpu_s = cpu
        self.results.append({"section": section, "label": label, "model": model, "wall_s": wall, "cpu_s": cpu,
                             **result.row(),
                             "violations": list(result.violations)})
        return result, wall

    def trace(self, name: str) -> AvailabilityTrace:
        return load_availability(self.data / "availability" / TRACES[name])


def paper(runner: Runner) -> None:
    values = published(runner.data)
    print("\n## GPT-20B, 0.35 req/s: simulated vs published (seconds; ratio sim/paper)\n")
    print("| trace | policy | avg sim | avg paper | ratio | P99 sim | P99 paper | ratio | cost/token | node-min spot+OD |"
          " restarted | KV moved GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    within = 0
    for trace_name in TRACES:
        trace = runner.trace(trace_name)
        p99s = {}
        for policy in POLICIES:
            result, _ = runner.run("paper", trace_name, OUR_NAME[policy], "gpt-20b", trace)
            avg_paper, p99_paper = values[(trace_name, policy)]
            ra, rp = result.latency_mean_s / avg_paper, result.latency_p99_s / p99_paper
            within += (abs(ra - 1) <= 0.2) + (abs(rp - 1) <= 0.2)
            p99s[policy] = result.latency_p99_s
            print(f"| {trace_name} | {policy} | {result.latency_mean_s:.1f} | {avg_paper:.1f} | {ra:.2f} | "
                  f"{result.latency_p99_s:.1f} | {p99_paper:.1f} | {rp:.2f} | {result.cost_per_token:.3f} | "
                  f"{result.spot_instance_s / 60:.0f}+{result.on_demand_instance_s / 60:.0f} | "
                  f"{result.requests_restarted} | {result.kv_bytes_migrated / 1e9:.1f} |")
        sim_order = sorted(POLICIES, key=lambda p: -p99s[p])
        paper_order = sorted(POLICIES, key=lambda p: -values[(trace_name, p)][1])
        print(f"|  | P99 order (worst first) | sim: {' > '.join(sim_order)} | paper: {' > '.join(paper_order)} "
              f"| {'same' if sim_order == paper_order else 'DIFFERENT'} |  |  |  |  |  |  |  |")
    print(f"\n{within} of 24 cells within 20% of the published value.")


def on_demand_fleets(runner: Runner) -> None:
    values = published(runner.data)
    length = runner.trace("A_S").end
    print(f"\n## On-demand fleets (GPT-20B, spotserve policy, {length:.0f} s of the 0.35 req/s arrivals)\n")
    print("| nodes | avg sim | avg paper | P99 sim | P99 paper | cost/token |")
    print("|---|---|---|---|---|---|")
    for nodes in (3, 4, 6, 8):
        events = tuple(InstanceEvent(0.0, "add", f"od-{i}", "on-demand") for i in range(nodes))
        result, _ = runner.run("ondemand", f"{nodes} nodes", "spotserve", "gpt-20b", AvailabilityTrace(events, length))
        avg, p99 = values[(f"on-demand-{nodes}-nodes", "spotserve")]
        print(f"| {nodes} | {result.latency_mean_s:.1f} | {avg:.1f} | {result.latency_p99_s:.1f} | {p99:.1f} | "
              f"{result.cost_per_token:.3f} |")


def ablations(runner: Runner) -> None:
    print("\n## SpotServe's ablations (GPT-20B, seconds)\n")
    print("| trace | policy | avg | P99 | restarted | reshards |")
    print("|---|---|---|---|---|---|")
    for trace_name in ("A_S", "B_S"):
        for policy in ("spotserve", *ABLATIONS):
            result, _ = runner.run("ablations", trace_name, policy, "gpt-20b", runner.trace(trace_name))
            print(f"| {trace_name} | {policy} | {result.latency_mean_s:.1f} | {result.latency_p99_s:.1f} | "
                  f"{result.requests_restarted} | {len(result.status['reshards'])} |")


def models(runner: Runner) -> None:
    print("\n## The 6.7B and 30B models at their rates (A_S, B_S; seconds)\n")
    print("| model | trace | policy | avg | P99 | cost/token |")
    print("|---|---|---|---|---|---|")
    for model in ("opt-6.7b", "spotserve-30b"):
        for trace_name in ("A_S", "B_S"):
            for policy in POLICIES:
                result, _ = runner.run("models", trace_name, OUR_NAME[policy], model, runner.trace(trace_name))
                print(f"| {model} | {trace_name} | {policy} | {result.latency_mean_s:.1f} | "
                      f"{result.latency_p99_s:.1f} | {result.cost_per_token:.3f} |")


def fixed_shape(runner: Runner) -> None:
    print("\n## Every policy with replicas fixed at (P, M) = (3, 4) (GPT-20B, seconds)\n")
    print("| trace | policy | avg | P99 | P99 paper | restarted |")
    print("|---|---|---|---|---|---|")
    values = published(runner.data)
    for trace_name in TRACES:
        for policy in POLICIES:
            result, _ = runner.run("fixed", trace_name, OUR_NAME[policy], "gpt-20b", runner.trace(trace_name),
                                   setting=replace(PaperSetting(), parallel=(3, 4)))
            print(f"| {trace_name} | {policy} | {result.latency_mean_s:.1f} | {result.latency_p99_s:.1f} | "
                  f"{values[(trace_name, policy)][1]:.1f} | {result.requests_restarted} |")


def speed(runner: Runner) -> None:
    print("\n## Simulator speed (simulated seconds per wall-clock second)\n")
    print("| run | instances (peak) | requests | events | simulated s | wall s | CPU s | sim s / wall s |")
    print("|---|---|---|---|---|---|---|---|")
    full = load_availability(runner.data / "availability" / "g4dn_full.csv")
    runs = [("12-hour g4dn trace, 0.35 req/s", full, gamma_arrivals(0.35, 6.0, full.end, 512, seed=0)),
            ("synthetic 512 instances, 300 s, 20 req/s",
             synthetic_availability(512, 300.0, 1800.0, seed=0),
             gamma_arrivals(20.0, 1.0, 300.0, 512, seed=0))]
    for label, trace, arrivals in runs:
        result, wall = runner.run("speed", label, "spotserve", "gpt-20b", trace, arrivals)
        print(f"| {label} | {trace.peak()} | {len(arrivals)} | {result.events} | {result.simulated_s:.0f} | "
              f"{wall:.1f} | {runner.cpu_s:.1f} | {result.simulated_s / wall:.0f} |")


def beyond(runner: Runner) -> None:
    values = published(runner.data)
    print(f"\n## Beyond SpotServe: capacity-aware policies ({runner.settings.batching} batching; seconds)\n")
    print("| trace | policy | avg | P99 | P99 paper (SpotServe) | paper / ours | cost/token | vs spotserve | "
          "node-min spot+OD | acquired | released | 2x at no higher cost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for trace_name in TRACES:
        trace = runner.trace(trace_name)
        paper_p99 = values[(trace_name, "spotserve")][1]
        base, _ = runner.run("beyond", trace_name, "spotserve", "gpt-20b", trace)
        for policy in ("spotserve", *BEYOND):
            result = base if policy == "spotserve" else runner.run("beyond", trace_name, policy, "gpt-20b", trace)[0]
            _beyond_row(trace_name, policy, result, base, paper_p99)
    full = load_availability(runner.data / "availability" / "g4dn_full.csv")
    arrivals = gamma_arrivals(0.35, 6.0, full.end, 512, seed=0)
    base, _ = runner.run("beyond", "g4dn_full", "spotserve", "gpt-20b", full, arrivals)
    for policy in ("spotserve", *BEYOND):
        result = base if policy == "spotserve" else runner.run("beyond", "g4dn_full", policy, "gpt-20b", full,
                                                               arrivals)[0]
        _beyond_row("12-hour g4dn", policy, result, base, None)
    print("\nThe latency floor: on-demand fleets of N instances for the A_S arrivals (spotserve policy)\n")
    print("| nodes | avg | P50 | P99 | cost/token |")
    print("|---|---|---|---|---|")
    length = runner.trace("A_S").end
    for nodes in (6, 9, 12, 20):
        events = tuple(InstanceEvent(0.0, "add", f"od-{i}", "on-demand") for i in range(nodes))
        result, _ = runner.run("beyond", f"floor {nodes}", "spotserve", "gpt-20b", AvailabilityTrace(events, length))
        print(f"| {nodes} | {result.latency_mean_s:.1f} | {result.latency_p50_s:.1f} | {result.latency_p99_s:.1f} | "
              f"{result.cost_per_token:.3f} |", flush=True)


def _beyond_row(trace: str, policy: str, result: SimResult, base: SimResult, paper_p99: float | None) -> None:
    ratio = paper_p99 / result.latency_p99_s if paper_p99 else float("nan")
    cheaper = result.cost_per_token <= base.cost_per_token * 1.0001
    missed = [name for name, ok in (("P99", ratio >= 2), ("cost", cheaper)) if not ok]
    verdict = "-" if paper_p99 is None else ("yes" if not missed else f"no ({' and '.join(missed)})")
    print(f"| {trace} | {policy} | {result.latency_mean_s:.1f} | {result.latency_p99_s:.1f} | "
          f"{paper_p99 if paper_p99 else '-'} | {ratio:.2f} | {result.cost_per_token:.3f} | "
          f"{result.cost_per_token / base.cost_per_token:.2f} | {result.spot_instance_s / 60:.0f}+"
          f"{result.on_demand_instance_s / 60:.0f} | {result.instances_acquired} | {result.instances_released} | "
          f"{verdict} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/spotserve")
    parser.add_argument("--sections", default="all")
    parser.add_argument("--batching", choices=("static", "continuous"), default="static")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                        help="a request scheduler inside each simulated replica (default: the --batching rule)")
    parser.add_argument("--storage-bandwidth", type=float, default=SimSettings().storage_bandwidth,
                        help="bytes/s one instance reads the checkpoint at (default 1.25e9 = 10 Gbps)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = parser.parse_args(argv)
    sections = SECTIONS if args.sections == "all" else tuple(s.strip() for s in args.sections.split(","))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)} or all")
    if not (args.data / "published_gpt20b.csv").exists():
        parser.error(f"--data {args.data} does not hold SpotServe's artifact data (published_gpt20b.csv)")
    if args.storage_bandwidth <= 0:
        parser.error("--storage-bandwidth must be > 0")
    settings = replace(SimSettings(), batching=args.batching, storage_bandwidth=args.storage_bandwidth,
                       scheduler=args.scheduler)
    runner = Runner(args.data, settings)
    print(f"# SpotServe reproduction in the fleet simulator ({args.scheduler or args.batching} batching, "
          f"checkpoint at {args.storage_bandwidth:.3g} B/s per instance)")
    for section in sections:
        {"paper": paper, "ondemand": on_demand_fleets, "ablations": ablations, "models": models,
         "fixed": fixed_shape, "speed": speed, "beyond": beyond}[section](runner)
    if args.json:
        args.json.write_text(json.dumps(runner.results, indent=1))
    bad = [r for r in runner.results if r["violations"]]
    if bad:
        print(f"\nINVARIANT VIOLATIONS in {len(bad)} runs: {bad[0]['violations']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
