"""How long a new replica takes to be ready: weights from a peer replica vs from the checkpoint store.

On a LocalCluster with worker processes (SmolLM2-135M-Instruct, fp32), for each policy in one run:
one worker joins and its replica loads (no peer exists yet: checkpoint), then more workers join one
at a time. Under `spotserve` each new replica is sent its weights by a ready peer, worker to
worker; under `reroute` it reads the checkpoint, which takes at least weights / bandwidth, as from
object storage (`--bandwidth`, default 200 MB/s). Reported per replica: where its weights came
from and the seconds from its creation to ready (weights in place, engine built). The machine is
idle meanwhile: no requests are served.

Run:  .venv/bin/python benchmarks/replica_start.py [--joins 2] [--bandwidth 200e6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

from distributed import Client, LocalCluster

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.checkpoint import DEFAULT_MODEL


def start_times(policy: str, joins: int, bandwidth: float) -> list[dict[str, Any]]:
    """The replicas of one worker plus `joins` joining ones, as the controller reports them."""
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=30.0)
        options = ReplicaOptions(model=DEFAULT_MODEL, checkpoint_bandwidth=bandwidth)
        llm = ServingClient(client, policy=policy, replica=options)
        for count, name in enumerate(["w0", *(f"w{i + 1}" for i in range(joins))], 1):
            emulator.acquire(name, market="spot", price_per_hour=1.9)
            llm.wait_for_replicas(count, timeout=600)
        replicas = [{k: r[k] for k in ("replica", "weights", "start_seconds")} for r in llm.status()["replicas"]]
        llm.close()
        emulator.stop()
    return replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joins", type=int, default=2, help="workers that join after the first")
    parser.add_argument("--bandwidth", type=float, default=200e6, help="checkpoint store, bytes/s")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}; checkpoint store at "
          f"{args.bandwidth / 1e6:.0f} MB/s", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for policy in ("spotserve", "reroute"):
        started = time.perf_counter()
        results[policy] = start_times(policy, args.joins, args.bandwidth)
        for replica in results[policy]:
            print(f"{policy:>10} {replica['replica']:>4}: weights from {replica['weights']:<10} "
                  f"ready after {replica['start_seconds']:.2f} s", flush=True)
        print(f"{policy:>10}: run took {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "replicas": results}, f, indent=2)


if __name__ == "__main__":
    main()
