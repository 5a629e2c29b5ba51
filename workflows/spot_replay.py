"""Replay a spot trace and a request workload for each controller policy, side by side.

For each policy (spotserve, reroute, reparallelize) a fresh LocalCluster with real worker processes
serves the same Poisson workload while the same time-compressed spot trace preempts (with notice,
then SIGKILL) and adds workers. Prints P50/P90/P99 latency, throughput, requests recomputed, KV
bytes migrated and dollar cost per policy.

Run:  python workflows/spot_replay.py [--trace A_S] [--max-instances 4] [--time-scale 30]
          [--requests 24] [--rate 0.5] [--max-new-tokens 96] [--policies spotserve,reroute,reparallelize]
          [--model smollm2-135m-instruct] [--checkpoint-bandwidth 2e8] [--parallel auto|P,M]
          [--memory-budget BYTES] [--profile docs/profiles/smollm2-cpu.json] [--required-rate R]
          [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict

from elastic_llm.control.policies import POLICY_NAMES
from elastic_llm.errors import ElasticLLMError
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.spot_replay import PolicyReport, ReplayConfig, run_policy
from elastic_llm.model.checkpoint import DEFAULT_MODEL

COLUMNS = (("policy", "{:>21}"), ("completed", "{:>5}"), ("lost", "{:>4}"), ("latency_p50_s", "{:>7.1f}"),
           ("latency_p90_s", "{:>7.1f}"), ("latency_p99_s", "{:>7.1f}"), ("throughput_tok_s", "{:>7.1f}"),
           ("requests_recomputed", "{:>6}"), ("tokens_recomputed", "{:>7}"), ("kv_bytes_migrated", "{:>11}"),
           ("weight_bytes_from_peers", "{:>11}"), ("cost_usd", "{:>7.3f}"), ("controller_overhead", "{:>7.2%}"),
           ("instances_acquired", "{:>4}"))
HEADERS = ("policy", "done", "lost", "P50 s", "P90 s", "P99 s", "tok/s", "recomp", "tok rec", "KV moved B",
           "peer wts B", "cost $", "ctl ovh", "acq")


def table(reports: list[PolicyReport]) -> str:
    """The side-by-side summary."""
    widths = [len(fmt.format(0)) for _, fmt in COLUMNS]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEADERS, widths, strict=True))]
    for report in reports:
        row = asdict(report)
        lines.append("  ".join(fmt.format(row[name]) for name, fmt in COLUMNS))
    return "\n".join(lines)


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ReplayConfig:
    """The replay's settings, checked before any cluster starts (bad ones: exit 2 with a message)."""
    try:
        parallel = "auto" if args.parallel == "auto" else tuple(int(x) for x in args.parallel.split(","))
    except ValueError:
        parser.error(f'--parallel must be "auto" or "P,M" (two integers), not {args.parallel!r}')
    try:
        replica = ReplicaOptions(model=args.model, max_batch_size=args.max_batch,
                                 checkpoint_bandwidth=args.checkpoint_bandwidth,
                                 parallel=parallel,  # type: ignore[arg-type]
                                 memory_budget_bytes=args.memory_budget)
        config = ReplayConfig(model=args.model, trace=args.trace, max_instances=args.max_instances,
                              time_scale=args.time_scale, grace_s=args.grace, requests=args.requests,
                              rate_per_s=args.rate, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              replica=replica, profile=args.profile, required_rate=args.required_rate)
        config.check()
    except (ElasticLLMError, ValueError) as exc:
        parser.error(str(exc))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--trace", default="A_S", help="A_S, B_S, A_S+O or B_S+O")
    parser.add_argument("--max-instances", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=30.0, help="trace seconds per wall second")
    parser.add_argument("--grace", type=float, default=120.0, help="grace period in trace seconds (AWS: 120)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=0.5, help="requests per wall second")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--checkpoint-bandwidth", type=float, default=2e8,
                        help="bytes/s at which replicas load weights from the checkpoint store")
    parser.add_argument("--parallel", default="1,1",
                        help='replica shape "P,M", or "auto": the planning core chooses it')
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="bytes of weights + KV one worker may hold (forces sharding below the model)")
    parser.add_argument("--profile", default=None, help="elastic-llm profile JSON for the shape optimizer")
    parser.add_argument("--policies", default="spotserve,reroute,reparallelize",
                        help=f"comma-separated, from: {', '.join(POLICY_NAMES)} (the last four: SpotServe's ablations)")
    parser.add_argument("--required-rate", type=float, default=0.0,
                        help="requests/s the fleet must serve: the planner's target, and what makes a "
                             "capacity-aware policy (beyond) acquire on-demand instances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the reports as JSON here")
    args = parser.parse_args()
    unknown = [p for p in args.policies.split(",") if p not in POLICY_NAMES]
    if unknown:
        parser.error(f"unknown policy {unknown[0]!r}: choose from {', '.join(POLICY_NAMES)}")
    config = _config(args, parser)
    print(f"machine: {platform.machine()}, python {platform.python_version()}; config: {config}", flush=True)
    reports = [run_policy(policy, config, on_progress=lambda line: print(line, flush=True))
               for policy in args.policies.split(",")]
    print(table(reports))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"config": vars(args), "reports": [asdict(r) for r in reports]}, handle, indent=2)


if __name__ == "__main__":
    main()
