"""The quickstart demo: real answers stream while spot workers are preempted and added.

A LocalCluster starts with two spot workers (real processes), each holding a replica of the
model. Several prompts are served at once; one answer is streamed to the terminal as its tokens
are committed. Meanwhile the spot emulator sends one worker a preemption notice (its requests move
to the other replica with their KV cache, then the process is killed) and acquires a new worker.
At the end: every answer, and what the controller did.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from distributed import Client, LocalCluster

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import G4DN_12XLARGE_SPOT_USD_PER_HOUR as SPOT_PRICE
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.checkpoint import DEFAULT_MODEL

QUESTIONS = (
    "Write a short story about a robot who learns to paint.",
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Why do leaves change colour in autumn?",
)


def run_demo(model: str = DEFAULT_MODEL, max_new_tokens: int = 96, grace_s: float = 6.0,
             write: Callable[[str], object] = sys.stdout.write) -> dict[str, object]:
    """Run the demo; returns the controller's final status."""
    def say(line: str) -> None:
        write(line + "\n")
        sys.stdout.flush()

    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        say(f"Dask dashboard: {client.dashboard_link}")
        emulator = SpotEmulator(cluster, SpotTrace("demo", 0.0, ()), grace_s=grace_s)
        for name in ("spot-1", "spot-2"):
            emulator.acquire(name, market="spot", price_per_hour=SPOT_PRICE)
        llm = ServingClient(client, model=model, replica=ReplicaOptions(model=model, max_batch_size=8),
                            migration_margin_s=2.0)
        say("loading the model on 2 spot workers ...")
        llm.wait_for_replicas(2)
        others = llm.map(QUESTIONS[1:], max_new_tokens=max_new_tokens)

        def churn() -> None:
            time.sleep(2.0)
            say(f"\n[spot] preemption notice for spot-1 ({grace_s:.0f} s grace): its requests migrate")
            emulator.preempt("spot-1", notice=True)
            say("\n[spot] spot-1 is gone; acquiring spot-3")
            emulator.acquire("spot-3", market="spot", price_per_hour=SPOT_PRICE)
            say("\n[spot] spot-3 joined")

        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        say(f"\n>>> {QUESTIONS[0]}")
        for piece in llm.stream(QUESTIONS[0], max_new_tokens=max_new_tokens):
            write(piece)
            sys.stdout.flush()
        say("")
        for question, future in zip(QUESTIONS[1:], others, strict=True):
            answer = future.result()
            say(f"\n>>> {question}\n{answer.text.strip()}\n    ({len(answer.token_ids)} tokens, "
                f"{answer.finish_time - answer.arrival_time:.1f} s)")
        churner.join()
        llm.wait_for_replicas(2)
        status = llm.status()
        llm.close()
    say("\nsummary: " + ", ".join([
        f"{status['finished']} requests finished",
        f"{sum(n['migrated'] for n in status['notices'])} migrated with their KV "  # type: ignore[union-attr]
        f"({status['kv_bytes_migrated'] / 2**20:.1f} MiB)",
        f"{status['tokens_recomputed']} tokens recomputed",
        f"{status['weight_bytes_from_peers'] / 2**20:.0f} MiB of weights from peers",
        f"{status['prefix_tokens_reused']} prompt tokens reused",
        f"cost ${status['cost']['spot_usd']:.4f} on spot vs "  # type: ignore[index]
        f"${status['cost']['on_demand_only_usd']:.4f} on demand",  # type: ignore[index]
    ]))
    return status

