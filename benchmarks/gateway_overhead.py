"""Gateway overhead: the OpenAI endpoint (`openai.AsyncOpenAI`, streaming) against the Python
`ServingClient.stream` on the same cluster in the same run, at several concurrency levels; then
the endpoint again while the fleet churns (a notice, a SIGKILL, a replacement). The openai load
generator runs in a separate process (`--load-in-process`: in this one, beside the scheduler).

Per mode and level: completion tokens per second over the phase's wall time, time to first text
(TTFT) and time per output token after the first (TPOT: (last piece - first piece) / (tokens - 1)),
P50 / P99 over requests. The two modes alternate (client, gateway, client, gateway) so that drift
on a shared machine hits both. Greedy requests with ignore_eos: every request yields exactly
`--tokens` tokens, and its text must equal the churn-free text of its prompt.

Run:  python benchmarks/gateway_overhead.py [--concurrency 1,8,32] [--requests-per-stream 2]
          [--tokens 32] [--workers 2] [--model smollm2-135m-instruct] [--rounds 2] [--json out.json]
All loops are bounded in count and time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any

import openai
from distributed import Client, LocalCluster

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.checkpoint import DEFAULT_MODEL
from elastic_llm.serve.server import GatewayServer
from elastic_llm.serve.settings import GatewaySettings

QUESTIONS = (
    "What is the capital of France?", "Write a haiku about the sea.", "List three uses of copper.",
    "Why is the sky blue?", "Explain recursion to a child.", "Name a famous painter.",
    "What does a compiler do?", "Give me a tip for sleeping well.",
)
PHASE_LIMIT_S = 600.0


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it."""

    prompt: int  #: index into QUESTIONS
    text: str  #: the joined pieces
    tokens: int  #: completion tokens
    ttft_s: float  #: request sent -> first text piece
    tpot_s: float | None  #: (last piece - first piece) / (tokens - 1)
    error: str = ""  #: why it broke, "" if it did not


def _sample(prompt: int, started: float, stamps: list[float], text: str, tokens: int, error: str = "") -> Sample:
    ttft = stamps[0] - started if stamps else float("nan")
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    return Sample(prompt, text, tokens, ttft, tpot, error)


def run_client(llm: ServingClient, concurrency: int, total: int, tokens: int) -> tuple[list[Sample], float]:
    """`total` requests through `ServingClient.stream` from `concurrency` threads; (samples, wall s)."""
    samples: list[Sample] = []
    lock = threading.Lock()
    next_index = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            prompt = index % len(QUESTIONS)
            started, stamps, pieces = time.perf_counter(), [], []
            for piece in llm.stream(QUESTIONS[prompt], max_new_tokens=tokens, ignore_eos=True):
                stamps.append(time.perf_counter())
                pieces.append(piece)
            with lock:
                samples.append(_sample(prompt, started, stamps, "".join(pieces), tokens))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PHASE_LIMIT_S)
    return samples, time.perf_counter() - began


async def _gateway_phase(url: str, concurrency: int, total: int, tokens: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(index)
    async with openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300) as api:
        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                prompt = index % len(QUESTIONS)
                started, stamps, pieces, used, error = time.perf_counter(), [], [], 0, ""
                try:
                    stream = await api.chat.completions.create(
                        model="bench", messages=[{"role": "user", "content": QUESTIONS[prompt]}], max_tokens=tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            stamps.append(time.perf_counter())
                            pieces.append(chunk.choices[0].delta.content)
                        if chunk.usage is not None:
                            used = chunk.usage.completion_tokens
                except openai.OpenAIError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                samples.append(_sample(prompt, started, stamps, "".join(pieces), used, error))

        began = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), PHASE_LIMIT_S)
        return samples, time.perf_counter() - began


def run_gateway(url: str, concurrency: int, total: int, tokens: int) -> tuple[list[Sample], float]:
    """`total` streamed chat completions through the endpoint, `concurrency` at a time."""
    return asyncio.run(_gateway_phase(url, concurrency, total, tokens))


_LOADER: list[concurrent.futures.ProcessPoolExecutor] = []


def run_gateway_elsewhere(url: str, concurrency: int, total: int, tokens: int) -> tuple[list[Sample], float]:
    """`run_gateway` in a separate process (as remote HTTP clients are): the openai client's own
    parsing then does not compete for this process's interpreter with the scheduler."""
    if not _LOADER:
        _LOADER.append(concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
    return _LOADER[0].submit(run_gateway, url, concurrency, total, tokens).result(PHASE_LIMIT_S + 60)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(samples: list[Sample], wall_s: float, reference: dict[int, str]) -> dict[str, Any]:
    """Throughput, TTFT and TPOT percentiles, and how many streams failed or broke."""
    ttft = [s.ttft_s for s in samples]
    tpot = [s.tpot_s for s in samples if s.tpot_s is not None]
    broken = sum(1 for s in samples if s.error or (s.prompt in reference and s.text != reference[s.prompt]))
    return {"requests": len(samples), "tokens": sum(s.tokens for s in samples), "wall_s": wall_s,
            "tokens_per_s": sum(s.tokens for s in samples) / wall_s, "ttft_p50_s": _pct(ttft, 0.5),
            "ttft_p99_s": _pct(ttft, 0.99), "tpot_p50_s": _pct(tpot, 0.5), "tpot_p99_s": _pct(tpot, 0.99),
            "failed": sum(1 for s in samples if s.error), "broken": broken}


def _churn(emulator: SpotEmulator, delay_s: float, log: list[str]) -> None:
    time.sleep(delay_s)
    emulator.preempt("spot-1", notice=True)
    log.append("spot-1 noticed and gone")
    emulator.acquire("spot-3", market="spot", price_per_hour=1.9)
    log.append("spot-3 joined")
    emulator.preempt("spot-2", notice=False)
    log.append("spot-2 SIGKILLed")
    emulator.acquire("spot-4", market="spot", price_per_hour=1.9)
    log.append("spot-4 joined")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests per concurrent stream")
    parser.add_argument("--min-requests", type=int, default=8, help="requests per phase at least")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="client/gateway alternations per level")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-churn", action="store_true")
    parser.add_argument("--load-in-process", action="store_true",
                        help="run the openai load generator in this process (default: a separate one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    if not all(1 <= c <= 256 for c in levels) or not 1 <= args.tokens <= 512 or not 1 <= args.rounds <= 5:
        parser.error("concurrency in [1, 256], tokens in [1, 512], rounds in [1, 5]")

    report: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, no GPU",
                              "args": vars(args), "levels": {}, "churn": None,
                              "load_average_at_start": os.getloadavg()}
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        emulator = SpotEmulator(cluster, SpotTrace("bench", 0.0, ()), grace_s=4.0)
        for i in range(args.workers):
            emulator.acquire(f"spot-{i + 1}", market="spot", price_per_hour=1.9)
        llm = ServingClient(client, model=args.model, replica=ReplicaOptions(model=args.model, max_batch_size=32),
                            migration_margin_s=1.5)
        llm.wait_for_replicas(args.workers, timeout=600)
        server = GatewayServer(llm, GatewaySettings(model_name="bench", max_pending=512, max_n=1), "127.0.0.1", 0)
        server.start_in_thread()
        url = server.url + "/v1"
        gateway_load = run_gateway if args.load_in_process else run_gateway_elsewhere
        reference: dict[int, str] = {}
        warm, _ = run_client(llm, len(QUESTIONS), len(QUESTIONS), args.tokens)  # warm-up, churn-free texts
        reference.update({s.prompt: s.text for s in warm})
        for level in levels:
            total = max(args.min_requests, level * args.requests_per_stream)
            runs: dict[str, list[tuple[list[Sample], float]]] = {"client": [], "gateway": []}
            for _ in range(args.rounds):
                runs["client"].append(run_client(llm, level, total, args.tokens))
                runs["gateway"].append(gateway_load(url, level, total, args.tokens))
            entry = {mode: summarize([s for samples, _ in phases for s in samples],
                                     sum(wall for _, wall in phases), reference) for mode, phases in runs.items()}
            entry["gateway_over_client_throughput"] = entry["gateway"]["tokens_per_s"] / entry["client"]["tokens_per_s"]
            entry["rounds_tokens_per_s"] = {mode: [sum(s.tokens for s in samples) / wall for samples, wall in phases]
                                            for mode, phases in runs.items()}
            report["levels"][level] = entry
            print(json.dumps({level: entry}, indent=1), flush=True)
        if not args.no_churn:
            level = max(levels)
            log: list[str] = []
            churner = threading.Thread(target=_churn, args=(emulator, 2.0, log), daemon=True)
            churner.start()
            samples, wall = [], 0.0
            for _ in range(8):  # load until the churn is over (at most 8 phases), then one more
                done = not churner.is_alive()
                more, seconds = gateway_load(url, level, max(args.min_requests, level), args.tokens)
                samples, wall = samples + more, wall + seconds
                if done:
                    break
            churner.join(300)
            status = llm.status()
            report["churn"] = {"concurrency": level, **summarize(samples, wall, reference), "events": log,
                               "tokens_recomputed": status["tokens_recomputed"],
                               "kv_bytes_migrated": status["kv_bytes_migrated"]}
            print(json.dumps({"churn": report["churn"]}, indent=1), flush=True)
        server.stop(timeout=60)
        llm.close()
    report["load_average_at_end"] = os.getloadavg()
    for loader in _LOADER:
        loader.shutdown()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=1)
    return report


if __name__ == "__main__":
    main()
