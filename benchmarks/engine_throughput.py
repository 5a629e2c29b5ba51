"""Decode throughput of our engine vs transformers `generate`, side by side in one run.

Same model (the embedded SmolLM2-135M-Instruct, fp32, the same cached safetensors), same machine,
same prompts, greedy decoding:

1. static batches of 1, 8 and 32 requests, 64 new tokens each (tokens/s including prefill, and
   decode-only tokens/s: the tokens generated after the step by which every request had its
   first token / the time after that step; a prefill may take several steps).
   Ours runs three times: prefix caching off; on but empty ("cold", the default engine on a
   fresh start: prompts arriving together that share a prefix compute it once); and on with
   only the chat template's system prompt (24 tokens) cached, by one unrelated chat request, as
   on a server whose earlier traffic used the same template. The prompts of a batch are
   distinct ("Request k: ..."), so they share only the template's system prompt; a cache kept
   between runs would reuse whole prompts, so it is cleared before each run;
2. a mixed workload: requests arrive spread out (Poisson), each wants 16-256 tokens. Our engine
   batches continuously (requests join and leave at any iteration); transformers must batch
   statically: each batch takes every request that has arrived and runs until its longest member
   is done. Reported: useful tokens / makespan, and mean / P99 request latency. Prefix caching
   is off here (the workload's prompts repeat).

Run:  .venv/bin/python benchmarks/engine_throughput.py [--requests 24] [--rate 2.0] [--threads 2]
      [--only batch1,batch8,batch32,mixed] [--repeats 1]

`--repeats N` runs each static batch N times for both systems, alternating, and reports each
system's best run (the same rule for both). Each part also prints how many CPU-seconds other
processes used meanwhile ("others"): far from 0 means the machine was not quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.model.loader import load_model

BASE_PROMPTS = (
    "Tell me a story about a dragon who learns to cook.",
    "What is the capital of France?",
    "Write a poem about autumn leaves falling in a quiet park.",
    "Explain how a computer works to a ten-year-old.",
    "Give me three ideas for a birthday party.",
    "Why is the sky blue?",
)


@dataclass
class WorkItem:
    arrival: float
    prompt_ids: list[int]
    new_tokens: int


class OtherLoad:
    """CPU-seconds that other processes used while a part ran (Linux /proc/stat; else None)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        return busy, sum(os.times()[:2])

    def seconds(self) -> float | None:
        end = self._sample()
        if end is None or self.start is None:
            return None
        return (end[0] - self.start[0]) - (end[1] - self.start[1])

    def text(self) -> str:
        others = self.seconds()
        return "" if others is None else f"  (others {others:.0f} cpu-s)"


class TokenClock:
    """Times a batch's generation step by step: each tick records the time, the tokens generated
    in that step and whether every request had its first token by then.

    Decode throughput = tokens generated after the first tick at which every request had started
    / the time from that tick to the last. (A prefill may take several steps: chunked prefill.)
    """

    def __init__(self) -> None:
        self.marks: list[tuple[float, int, bool]] = []

    def tick(self, tokens: int, all_started: bool) -> None:
        self.marks.append((time.perf_counter(), tokens, all_started))

    def decode_tok_s(self) -> float:
        start = next((i for i, mark in enumerate(self.marks) if mark[2]), None)
        if start is None or start == len(self.marks) - 1:
            raise RuntimeError("no decode steps after every request started")
        tokens = sum(mark[1] for mark in self.marks[start + 1:])
        return tokens / (self.marks[-1][0] - self.marks[start][0])


def _stopping_clock(clock: TokenClock):  # type: ignore[no-untyped-def]
    """A transformers StoppingCriteria that never stops and ticks `clock` after every token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
            clock.tick(input_ids.shape[0], True)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return StoppingCriteriaList([Tick()])


def hf_generate(model, batch: list[list[int]], new_tokens: int,  # type: ignore[no-untyped-def]
                clock: TokenClock | None = None) -> None:
    """Left-padded static batch through transformers generate, exactly `new_tokens` each."""
    width = max(len(p) for p in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0,
                       stopping_criteria=_stopping_clock(clock) if clock is not None else None)


def ours_generate(engine: LLMEngine, batch: list[list[int]], params: SamplingParams, clock: TokenClock) -> None:
    """The same batch through our engine, step by step, ticking `clock` after every step."""
    ids = [f"bench-{i}" for i in range(len(batch))]
    for request_id, prompt in zip(ids, batch, strict=True):
        engine.add_request(request_id, prompt, params)
    started: set[str] = set()
    while engine.has_unfinished():
        outputs = engine.step()
        started.update(out.request_id for out in outputs if out.new_token_ids)
        clock.tick(sum(len(out.new_token_ids) for out in outputs), len(started) == len(ids))
    for request_id in ids:
        engine.pop_completion(request_id)


class PrefixCaching:
    """Sets the engine's prefix cache for a measured run (`MODES`)."""

    MODES = ("off", "cold", "system")  #: off; on but empty; on with only the system prompt cached
    WARM_PROMPT = "Hello!"  #: an unrelated chat request: shares only the template's system prompt

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.cache = engine.executor.prefixes  # type: ignore[attr-defined]

    def set(self, mode: str) -> None:
        self.engine.executor.prefixes = None if mode == "off" else self.cache  # type: ignore[attr-defined]
        if mode != "off":
            self.cache.clear()
        if mode == "system":
            self.engine.generate([self.WARM_PROMPT], SamplingParams(max_new_tokens=1), chat=True)


def distinct_prompts(engine: LLMEngine, n: int) -> list[list[int]]:
    """`n` chat prompts that differ right after the chat template's framing ("Request k: ..."):
    the only prefix they share is the template's system prompt, as with distinct users."""
    assert engine.tokenizer is not None
    return [engine.tokenizer.chat_prompt_ids(f"Request {i + 1}: {BASE_PROMPTS[i % len(BASE_PROMPTS)]}")
            for i in range(n)]


def static_batches(engine: LLMEngine, hf_model, prompts: list[list[int]],  # type: ignore[no-untyped-def]
                   sizes: tuple[int, ...] = (1, 8, 32), repeats: int = 1) -> list[dict]:
    """Each size: `repeats` rounds of our engine in every prefix-cache mode, then transformers.
    Decode-only throughput comes from the "off" runs (every prompt prefilled in full there)."""
    rows = []
    prefixes = PrefixCaching(engine)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    for batch_size in sizes:
        batch = prompts[:batch_size]
        load = OtherLoad()
        runs: dict[str, list[float]] = {name: [] for name in (*PrefixCaching.MODES, "transformers")}
        decode: dict[str, list[float]] = {"off": [], "transformers": []}
        reused: dict[str, int] = {}
        for _ in range(repeats):
            for mode in PrefixCaching.MODES:
                prefixes.set("off")
                engine.generate(batch[:1], SamplingParams(max_new_tokens=2))  # warm-up, caching nothing
                prefixes.set(mode)
                before = engine.stats()
                clock = TokenClock()
                started = time.perf_counter()
                ours_generate(engine, batch, params, clock)
                runs[mode].append(batch_size * 64 / (time.perf_counter() - started))
                after = engine.stats()
                reused[mode] = after.prefix_tokens_reused - before.prefix_tokens_reused
                if mode == "off":
                    decode["off"].append(clock.decode_tok_s())
            hf_generate(hf_model, batch[:1], 2)
            clock = TokenClock()
            started = time.perf_counter()
            hf_generate(hf_model, batch, 64, clock)
            runs["transformers"].append(batch_size * 64 / (time.perf_counter() - started))
            decode["transformers"].append(clock.decode_tok_s())
        best = {name: max(values) for name, values in runs.items()}
        theirs = best["transformers"]
        dec_ours, dec_theirs = max(decode["off"]), max(decode["transformers"])
        rows.append({"batch": batch_size, "best_tok_s": best, "runs_tok_s": runs,
                     "ratio": {mode: best[mode] / theirs for mode in PrefixCaching.MODES},
                     "decode_tok_s": {"ours_off": dec_ours, "transformers": dec_theirs},
                     "decode_ratio": dec_ours / dec_theirs, "prefix_tokens_reused": reused,
                     "others_cpu_s": load.seconds()})
        modes = "  ".join(f"{mode} {best[mode]:6.1f} ({best[mode] / theirs:.2f}x, {reused[mode]} reused)"
                          for mode in PrefixCaching.MODES)
        print(f"batch {batch_size:>2}: transformers {theirs:6.1f} tok/s | ours, prefix cache {modes} | "
              f"decode only: ours {dec_ours:6.1f} transformers {dec_theirs:6.1f} "
              f"({dec_ours / dec_theirs:.2f}x){load.text()}", flush=True)
    return rows


def make_workload(prompts: list[list[int]], n: int, rate: float, seed: int) -> list[WorkItem]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    lengths = rng.integers(16, 257, n)
    return [WorkItem(float(a), prompts[i % len(prompts)], int(k))
            for i, (a, k) in enumerate(zip(arrivals, lengths, strict=True))]


def run_ours(engine: LLMEngine, work: list[WorkItem]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    pending = list(enumerate(work))
    latencies: list[float] = []
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][1].arrival <= now:
            i, item = pending.pop(0)
            engine.add_request(str(i), item.prompt_ids,
                               SamplingParams(max_new_tokens=item.new_tokens, ignore_eos=True))
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][1].arrival - now))
            continue
        for output in engine.step():
            if output.finished:
                done = time.perf_counter() - start
                latencies.append(done - work[int(output.request_id)].arrival)
                engine.pop_completion(output.request_id)
    return time.perf_counter() - start, latencies


def run_static(hf_model, work: list[WorkItem], max_batch: int = 32) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    pending = list(work)
    latencies: list[float] = []
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival > now:
            time.sleep(pending[0].arrival - now)
            now = time.perf_counter() - start
        batch = [w for w in pending if w.arrival <= now][:max_batch]
        pending = pending[len(batch):]
        hf_generate(hf_model, [w.prompt_ids for w in batch], max(w.new_tokens for w in batch))
        done = time.perf_counter() - start
        latencies.extend(done - w.arrival for w in batch)
    return time.perf_counter() - start, latencies


def summarize(name: str, makespan: float, latencies: list[float], tokens: int,
              load: OtherLoad | None = None) -> dict:
    row = {"system": name, "makespan_s": makespan, "useful_tok_s": tokens / makespan,
           "mean_latency_s": float(np.mean(latencies)), "p99_latency_s": float(np.percentile(latencies, 99)),
           "others_cpu_s": load.seconds() if load is not None else None}
    print(f"mixed {name:>12}: {row['useful_tok_s']:6.1f} useful tok/s, makespan {makespan:6.1f} s, "
          f"mean latency {row['mean_latency_s']:6.1f} s, P99 {row['p99_latency_s']:6.1f} s"
          f"{load.text() if load is not None else ''}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=2.0, help="mixed-workload arrivals per second")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="static batches: runs per system (alternating); the best of each is reported")
    parser.add_argument("--only", default="batch1,batch8,batch32,mixed",
                        help="comma-separated parts to run: batch1, batch8, batch32, mixed")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"batch1", "batch8", "batch32", "mixed"}
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    model = load_model("smollm2-135m-instruct")
    engine = LLMEngine(model)  # default limits: 32 requests, on a CPU 512 tokens per iteration
    pages = model.network.packed_pages  # huge-page backing of the packed weights (a start-up cost)
    huge_mib = pages.wait() / 2**20 if pages is not None else 0.0
    hf_model = LlamaForCausalLM.from_pretrained(model.checkpoint_dir).eval()
    assert model.tokenizer is not None
    prompts = [model.tokenizer.chat_prompt_ids(p) for p in BASE_PROMPTS]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, engine limits {engine.limits}, "
          f"packed weights on huge pages: {huge_mib:.0f} MiB", flush=True)
    sizes = tuple(size for size in (1, 8, 32) if f"batch{size}" in parts)
    static = static_batches(engine, hf_model, distinct_prompts(engine, max(sizes, default=1)), sizes,
                            max(1, args.repeats))
    mixed: list[dict] = []
    if "mixed" in parts:
        PrefixCaching(engine).set("off")
        work = make_workload(prompts, args.requests, args.rate, args.seed)
        tokens = sum(w.new_tokens for w in work)
        load = OtherLoad()
        ours = summarize("elastic_llm", *run_ours(engine, work), tokens, load)
        load = OtherLoad()
        theirs = summarize("transformers", *run_static(hf_model, work), tokens, load)
        print(f"mixed workload throughput ratio: {ours['useful_tok_s'] / theirs['useful_tok_s']:.2f}x, "
              f"mean latency ratio (transformers / ours): {theirs['mean_latency_s'] / ours['mean_latency_s']:.2f}x")
        mixed = [ours, theirs]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"static": static, "mixed": mixed, "args": vars(args), "huge_page_mib": huge_mib}, f, indent=2)


if __name__ == "__main__":
    main()
