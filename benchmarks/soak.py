"""Soak: minutes of load on a churning fleet; reports lost, duplicated and wrong requests and the
scheduler's memory over time.

A LocalCluster with real worker processes serves a stream of greedy requests while the churn loop
preempts workers with notice (then SIGKILL at the deadline), SIGKILLs others without notice, and
acquires replacements (`SpotEmulator`). Every answer is compared with a churn-free single-process
`LLMEngine` run of the same prompts. Memory: the resident set of this process (the scheduler runs
in it) and the controller's table sizes, sampled every few seconds; "flat" means the last third
of the samples grows less than `--flat-mib`.

Run:  python benchmarks/soak.py [--minutes 3] [--workers 3] [--rate 2] [--max-new-tokens 24]
          [--model smollm2-135m-instruct] [--churn-every 15] [--keep-finished N] [--json out.json]
All loops are bounded in count and time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
import tracemalloc
from typing import Any

import psutil
from distributed import Client, LocalCluster

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.checkpoint import DEFAULT_MODEL
from elastic_llm.model.loader import load_model


def _prompts(count: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, min(vocab, 5000)) for _ in range(rng.randrange(4, 40))] for _ in range(count)]


def _churn(emulator: SpotEmulator, stop: threading.Event, every_s: float, names: list[str],
           log: list[dict[str, Any]], seed: int) -> None:
    """Every `every_s`: a notice (then SIGKILL) or a SIGKILL without notice, then a replacement."""
    rng = random.Random(seed)
    serial = len(names)
    while not stop.wait(every_s):
        victim = rng.choice(sorted(emulator.live))
        notice = rng.random() < 0.6
        try:
            emulator.preempt(victim, notice=notice, timeout=60)
            replacement = f"w{serial}"
            serial += 1
            emulator.acquire(replacement, market="spot", price_per_hour=1.0)
            log.append({"time": time.time(), "killed": victim, "notice": notice, "joined": replacement})
        except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
            log.append({"time": time.time(), "error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--churn-every", type=float, default=15.0, help="seconds between churn events")
    parser.add_argument("--grace", type=float, default=4.0, help="seconds of notice")
    parser.add_argument("--policy", default="spotserve")
    parser.add_argument("--flat-mib", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-finished", type=int, default=10_000,
                        help="finished requests the controller keeps in full (a small value shows the bound)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="name the allocation sites of this process that grew over the last two thirds")
    args = parser.parse_args()

    model = load_model(args.model)
    count = int(args.minutes * 60 * args.rate)
    prompts = _prompts(count, args.seed, model.spec.vocab_size)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    print(f"[soak] {platform.machine()}, python {platform.python_version()}: reference run of {count} prompts",
          flush=True)
    reference = [c.token_ids for c in LLMEngine(model).generate(prompts, params)]
    del model

    process = psutil.Process()
    samples: list[dict[str, float]] = []
    churn_log: list[dict[str, Any]] = []
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=args.grace)
        names = [f"w{i}" for i in range(args.workers)]
        for name in names:
            emulator.acquire(name, market="spot", price_per_hour=1.0)
        options = ReplicaOptions(model=args.model, max_batch_size=8)
        with ServingClient(client, model=args.model, policy=args.policy, replica=options, chat=False,
                           max_finished_records=args.keep_finished) as llm:
            llm.wait_for_replicas(args.workers, timeout=300)
            stop = threading.Event()
            churner = threading.Thread(target=_churn, args=(emulator, stop, args.churn_every, names, churn_log,
                                                            args.seed), daemon=True)
            churner.start()
            began, futures = time.time(), []
            snapshot_at, first_snapshot = count // 3, None
            deadline = began + args.minutes * 60
            for index, prompt in enumerate(prompts):  # bounded: `count` requests, paced
                time.sleep(max(0.0, began + index / args.rate - time.time()))
                if args.tracemalloc and index == 0:
                    tracemalloc.start(8)
                if args.tracemalloc and index == snapshot_at:
                    first_snapshot = tracemalloc.take_snapshot()
                futures.append(llm.submit(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True))
                if index % max(1, int(5 * args.rate)) == 0:
                    controller = client.cluster.scheduler.plugins["elastic_llm"]
                    samples.append({"t": time.time() - began, "rss_mib": process.memory_info().rss / 2**20,
                                    "records": len(controller.table), "status_keys": len(llm.status())})
                if index % max(1, int(15 * args.rate)) == 0:  # progress about every 15 s
                    done = sum(f.done() for f in futures)
                    print(f"[soak] {time.time() - began:5.0f} s: {index + 1}/{count} submitted, {done} done, "
                          f"{len(churn_log)} churn events, rss {process.memory_info().rss / 2**20:.0f} MiB",
                          flush=True)
            growth_sites = []
            if first_snapshot is not None:
                top = tracemalloc.take_snapshot().compare_to(first_snapshot, "traceback")[:8]
                growth_sites = [{"kib": round(s.size_diff / 1024, 1), "count": s.count_diff,
                                 "where": [str(frame) for frame in s.traceback.format()[-6:]]} for s in top]
                tracemalloc.stop()
            stop.set()
            print(f"[soak] all {count} submitted; waiting for the last answers", flush=True)
            results: list[Any] = []
            for future in futures:  # bounded: each waits until the soak's end plus 5 minutes at most
                try:
                    results.append(future.result(timeout=max(10.0, deadline + 300 - time.time())))
                except Exception as exc:  # noqa: BLE001 - counted as lost
                    results.append(exc)
            churner.join(timeout=120)
            status = llm.status()
    lost = sum(isinstance(r, Exception) for r in results)
    wrong = sum(not isinstance(r, Exception) and tuple(r.token_ids) != tuple(want)
                for r, want in zip(results, reference, strict=True))
    # each request ends exactly once at the controller: more endings than requests is a duplicate
    duplicated = status["finished"] + status["failed"] - len(results)
    tail = samples[len(samples) * 2 // 3:]
    growth = (tail[-1]["rss_mib"] - tail[0]["rss_mib"]) if len(tail) >= 2 else 0.0
    report = {"requests": len(results), "lost": lost, "wrong": wrong, "duplicated": max(0, duplicated),
              "churn_events": len(churn_log), "churn_errors": sum("error" in c for c in churn_log),
              "notices": len(status["notices"]), "restarts": status["restarts"],
              "kv_bytes_migrated": status["kv_bytes_migrated"], "rss_growth_last_third_mib": growth,
              "memory_flat": growth < args.flat_mib, "growth_sites": growth_sites, "samples": samples,
              "churn": churn_log}
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "churn", "growth_sites")}, indent=2))
    for site in growth_sites:
        print(f"[soak] grew {site['kib']} KiB in {site['count']} blocks at:\n    " + "\n    ".join(site["where"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), **report}, handle, indent=2)


if __name__ == "__main__":
    main()
