"""How well the fleet simulator predicts the live spot replay on this machine, per policy.

Simulates the setting of a recorded `workflows/spot_replay.py` run (its JSON output: trace,
instance cap, time compression, grace, workload, batch, checkpoint bandwidth) with the SmolLM2
profile measured here (`docs/profiles/smollm2-cpu.json`), whole-model replicas and continuous
batching, the live run's own prompts (their chat-template token counts) with the workload's
arrivals and output lengths, and prints simulated against measured mean and P99 latency. The live run is not
repeated: its figures are read from the JSON.

Run:  python workflows/sim_fidelity.py [--live docs/results/spot_replay_A_S_2026-11-24.json]
          [--profile docs/profiles/smollm2-cpu.json] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from elastic_llm.cluster.spot_replay import PROMPTS
from elastic_llm.cluster.traces import load_trace
from elastic_llm.control import FleetConfig, FleetState
from elastic_llm.model.checkpoint import resolve_checkpoint
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.tokenizer import Tokenizer
from elastic_llm.scheduling.workloads import make_workload
from elastic_llm.sim import FleetSimulator, SimSettings
from elastic_llm.sim.replica import IterationClock
from elastic_llm.sim.traces import Arrival, AvailabilityTrace, InstanceEvent
from elastic_llm.sim_loaders import load_profile

ROOT = Path(__file__).resolve().parents[1]


def availability(name: str, cap: int, time_scale: float) -> AvailabilityTrace:
    """The live replay's capped trace in wall seconds (preempt and kill both remove)."""
    trace = load_trace(name).capped(cap)
    events = tuple(InstanceEvent(e.offset_s / time_scale, "add" if e.action == "acquire" else "remove",
                                 e.instance_id, e.market) for e in trace.events)
    return AvailabilityTrace(events, trace.duration_s / time_scale)


def live_prompt_tokens(checkpoint: Path, spec: ModelSpec) -> list[int]:
    """Prompt tokens of the live replay's requests: its chat prompts (`spot_replay.PROMPTS`, in
    turn) under the model's chat template, as `ServingClient.submit` sends them. (The workload's
    ShareGPT-shaped prompt lengths are not what the live run sent: only its arrivals and output
    lengths are.)"""
    tokenizer = Tokenizer(checkpoint, spec.eos_token_ids)
    return [len(tokenizer.chat_prompt_ids(prompt)) for prompt in PROMPTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=Path, default=ROOT / "docs/results/spot_replay_A_S_2026-11-24.json")
    parser.add_argument("--profile", type=Path, default=ROOT / "docs/profiles/smollm2-cpu.json")
    parser.add_argument("--cores", type=int, default=2,
                        help="cores the live replay's worker processes shared (0: not shared)")
    args = parser.parse_args(argv)
    if args.cores < 0:
        parser.error("--cores must be >= 0")
    args.cores = args.cores or None
    try:
        live = json.loads(args.live.read_text())
        config, reports = live["config"], {r["policy"]: r for r in live["reports"]}
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"--live {args.live}: not a spot_replay.py result ({err})")
    profile = load_profile(args.profile)
    checkpoint = resolve_checkpoint(config["model"])
    spec = ModelSpec.from_hf_config(json.loads((checkpoint / "config.json").read_text()), name=config["model"])
    scale = float(config["time_scale"])
    trace = availability(config["trace"], int(config["max_instances"]), scale)
    workload = make_workload(int(config["requests"]), float(config["rate"]), "sharegpt", seed=int(config["seed"]),
                             max_output_tokens=int(config["max_new_tokens"]))
    prompt_tokens = live_prompt_tokens(checkpoint, spec)
    arrivals = [Arrival(w.arrival_s, prompt_tokens[i % len(prompt_tokens)], w.output_tokens)
                for i, w in enumerate(workload)]
    settings = SimSettings(grace_period_s=float(config["grace"]) / scale, gpus_per_instance=1,
                           gpu_memory_bytes=profile.device_memory_bytes,
                           storage_bandwidth=float(config["checkpoint_bandwidth"]),
                           link_bandwidth=profile.network_bandwidth, max_batch=int(config["max_batch"]),
                           batching="continuous", warm_start=False, spot_price=1.9046 * scale,
                           on_demand_price=3.912 * scale, shared_cores=args.cores)
    print(f"live: {args.live.name}; simulated with {args.profile.name}, workers sharing "
          f"{args.cores or 'no'} cores (2-core CPU, no GPU)\n")
    print("| policy | mean sim | mean live | ratio | P99 sim | P99 live | ratio | restarted sim/live |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, report in reports.items():
        fleet = FleetState(policy, FleetConfig(parallel=(1, 1), max_batch_size=settings.max_batch,
                                               max_events_per_client=0), profile=profile)
        clock = IterationClock(spec, profile, prompt_tokens=profile.input_len)
        result = FleetSimulator(fleet, spec, clock, settings).run(trace, arrivals)
        print(f"| {policy} | {result.latency_mean_s:.1f} | {report['latency_mean_s']:.1f} | "
              f"{result.latency_mean_s / report['latency_mean_s']:.2f} | {result.latency_p99_s:.1f} | "
              f"{report['latency_p99_s']:.1f} | {result.latency_p99_s / report['latency_p99_s']:.2f} | "
              f"{result.requests_restarted}/{report['requests_recomputed']} |")
        if result.violations:
            print(f"  violations: {result.violations}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
