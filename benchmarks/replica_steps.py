"""Sharded replica on SmolLM2: step time per (P, M), all-reduce and stage-hop latency, and the
bytes and seconds of live reconfigurations.

1. Step time: one `ShardedExecutor` (P*M worker processes, one torch thread each) reconfigured
   through every (P, M); per configuration and batch size, a prefill step (every request's
   prompt in one step) and decode steps (one token per request), median over repeats. Baseline:
   the single-process `LocalExecutor` with 1 and with 2 torch threads.
2. Communication: our `Collectives` (gloo) in separate processes: all-reduce of [rows, hidden]
   fp32 over M ranks, and a stage hop (send + recv of [rows, hidden], half a ping-pong).
3. Reconfiguration (2,2) -> (1,3) -> (3,1) -> (1,1) with requests in flight (their KV moves),
   then back to (2,2) (processes started again): bytes and seconds per step, medians over repeats.

Run:  .venv/bin/python benchmarks/replica_steps.py [--repeats 3] [--decode-steps 16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.local_executor import LocalExecutor
from elastic_llm.engine.replica.comm import Collectives
from elastic_llm.engine.replica.messages import GroupSpec
from elastic_llm.engine.replica.sharded_executor import ShardedExecutor
from elastic_llm.model.loader import load_model
from elastic_llm.planning import ParallelConfig

SHAPES = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)]
RECONFIGURATIONS = [(2, 2), (1, 3), (3, 1), (1, 1)]


def cfg(stages: int, degree: int) -> ParallelConfig:
    return ParallelConfig(D=1, P=stages, M=degree, B=8)


def run_requests(executor: Any, batch: int, prompt_len: int, decode_steps: int, tag: str
                 ) -> tuple[float, float]:
    """(prefill seconds, median decode-step seconds) for `batch` fresh requests."""
    generator = torch.Generator().manual_seed(batch)
    ids = [f"{tag}-{i}" for i in range(batch)]
    works = [StepWork(rid, tuple(torch.randint(1, 40000, (prompt_len,), generator=generator).tolist()),
                      0, True) for rid in ids]
    began = time.perf_counter()
    executor.execute(works)
    prefill = time.perf_counter() - began
    steps = []
    for step in range(decode_steps):
        works = [StepWork(rid, (100 + step,), prompt_len + step, True) for rid in ids]
        began = time.perf_counter()
        executor.execute(works)
        steps.append(time.perf_counter() - began)
    for rid in ids:
        executor.release(rid)
    return prefill, statistics.median(steps)


def step_times(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        local = LocalExecutor(model.network, model.spec)
        for batch in args.batches:
            runs = [run_requests(local, batch, args.prompt_len, args.decode_steps, f"l{r}")
                    for r in range(args.repeats)]
            rows.append({"system": f"local, {threads} thread(s)", "P": 1, "M": 1, "batch": batch,
                         "prefill_s": statistics.median(r[0] for r in runs),
                         "decode_step_s": statistics.median(r[1] for r in runs)})
            print(rows[-1], flush=True)
    torch.set_num_threads(1)
    with ShardedExecutor(model, cfg(*SHAPES[0])) as executor:
        for shape in SHAPES:
            executor.reconfigure(cfg(*shape))
            for micro in ([None, 1] if shape[0] > 1 else [None]):  # default: P micro-batches
                executor.micro_batches = micro
                for batch in args.batches:
                    runs = [run_requests(executor, batch, args.prompt_len, args.decode_steps, f"s{r}")
                            for r in range(args.repeats)]
                    rows.append({"system": "sharded", "P": shape[0], "M": shape[1], "batch": batch,
                                 "micro_batches": min(batch, micro or shape[0]),
                                 "prefill_s": statistics.median(r[0] for r in runs),
                                 "decode_step_s": statistics.median(r[1] for r in runs)})
                    print(rows[-1], flush=True)
    return rows


def _comm_worker(rank: int, world: int, port: int, hidden: int, rows_list: list[int], iters: int,
                 queue: Any) -> None:
    torch.set_num_threads(1)
    comm = Collectives()
    comm.join(GroupSpec("127.0.0.1", port, 0, rank, world, "gloo", (tuple(range(world)),), 60.0))
    out: dict[str, float] = {}
    for rows in rows_list:
        x = torch.ones(rows, hidden)
        for _ in range(5):
            comm.all_reduce(x)
        began = time.perf_counter()
        for _ in range(iters):
            comm.all_reduce(x)
        out[f"all_reduce_{rows}"] = (time.perf_counter() - began) / iters
        if world == 2:  # ping-pong between the two ranks: a stage hop is half a round trip
            began = time.perf_counter()
            for _ in range(iters):
                if rank == 0:
                    comm.send(x, 1).wait()
                    x = comm.recv((rows, hidden), torch.float32, torch.device("cpu"), 1)
                else:
                    x = comm.recv((rows, hidden), torch.float32, torch.device("cpu"), 0)
                    comm.send(x, 0).wait()
            out[f"hop_{rows}"] = (time.perf_counter() - began) / iters / 2
    comm.leave()
    queue.put((rank, out))


def comm_latency(hidden: int, repeats: int) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    rows_list = [1, 8, 64]
    results = []
    for world in (2, 3):
        samples: list[dict[str, float]] = []
        for _ in range(repeats):
            store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=60))
            queue = context.Queue()
            procs = [context.Process(target=_comm_worker, daemon=True,
                                     args=(r, world, store.port, hidden, rows_list, 200, queue))
                     for r in range(world)]
            for p in procs:
                p.start()
            got = dict(queue.get(timeout=300) for _ in procs)
            for p in procs:
                p.join()
            samples.append(got[0])
        for key in samples[0]:
            kind, rows = key.rsplit("_", 1)
            results.append({"measure": kind, "ranks": world, "rows": int(rows),
                            "ms": 1e3 * statistics.median(s[key] for s in samples)})
            print(results[-1], flush=True)
    return results


def reconfigurations(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    samples: dict[str, list[dict[str, Any]]] = {}
    torch.set_num_threads(1)
    with ShardedExecutor(model, cfg(*RECONFIGURATIONS[0])) as executor:
        for repeat in range(args.repeats):
            if repeat:
                report = executor.reconfigure(cfg(*RECONFIGURATIONS[0]))
                samples.setdefault("(1, 1) -> (2, 2)", []).append(_report_row(report))
            generator = torch.Generator().manual_seed(repeat)
            ids = [f"m{repeat}-{i}" for i in range(8)]
            executor.execute([StepWork(rid, tuple(torch.randint(1, 40000, (64,), generator=generator)
                                                  .tolist()), 0, True) for rid in ids])
            length = 64
            for old, new in zip(RECONFIGURATIONS, RECONFIGURATIONS[1:], strict=False):
                for _ in range(4):  # decode a little on each configuration
                    executor.execute([StepWork(rid, (7,), length, True) for rid in ids])
                    length += 1
                cached = sum(executor.kv_length(rid) for rid in ids)
                report = executor.reconfigure(cfg(*new))
                samples.setdefault(f"{old} -> {new}", []).append({**_report_row(report),
                                                                   "kv_tokens": cached})
            for rid in ids:
                executor.release(rid)
    rows = []
    for name, runs in samples.items():
        row = {"change": name, **{k: v for k, v in runs[0].items() if k.endswith(("bytes", "requests", "tokens"))}}
        row.update({k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")})
        rows.append(row)
        print(row, flush=True)
    return rows


def _report_row(report: Any) -> dict[str, Any]:
    return {"weight_bytes": report.weight_bytes, "kv_bytes": report.kv_bytes,
            "checkpoint_bytes": report.checkpoint_bytes, "kv_requests": report.kv_requests,
            "kv_tokens": 0,
            "spawn_s": report.spawn_seconds, "plan_s": report.plan_seconds,
            "group_s": report.group_seconds, "migrate_s": report.migrate_seconds,
            "total_s": report.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    model = load_model("smollm2-135m-instruct")
    began = time.perf_counter()
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{multiprocessing.cpu_count()} cores, torch {torch.__version__}",
              "comm": comm_latency(model.spec.hidden_size, args.repeats),
              "reconfigure": reconfigurations(model, args),
              "steps": step_times(model, args)}
    result["seconds"] = time.perf_counter() - began
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
