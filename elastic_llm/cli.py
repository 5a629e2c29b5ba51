"""`elastic-llm` command line: generate (streaming), the quickstart demo, and profile (timings
of this machine for the cost model)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from elastic_llm.errors import ElasticLLMError

DEMO_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Give three tips for staying focused while studying.",
    "Explain what a spot instance is in cloud computing, briefly.",
)


def _engine(model: str, threads: int | None):  # type: ignore[no-untyped-def]
    import torch

    from elastic_llm.engine import LLMEngine

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    engine = LLMEngine(model)
    print(f"[elastic-llm] loaded {engine.spec.name} ({engine.spec.total_params / 1e6:.0f}M params) "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return engine


def _stream(engine, prompts: Sequence[str], max_new_tokens: int, temperature: float,  # type: ignore[no-untyped-def]
            seed: int | None, chat: bool) -> None:
    """Run `prompts` in one continuous batch; print each answer as its tokens arrive."""
    from elastic_llm.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    ids = [f"prompt-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params, chat=chat)
    buffered = {request_id: [] for request_id in ids}
    done: set[str] = set()
    shown = 0  # index of the answer being streamed live
    tokens, started = 0, time.perf_counter()
    if len(prompts) > 1:
        print(f"\n>>> {prompts[0]}\n", flush=True)
    while engine.has_unfinished():
        for output in engine.step():
            tokens += len(output.new_token_ids)
            buffered[output.request_id].append(output.new_text)
            if output.finished:
                done.add(output.request_id)
        while shown < len(ids):
            print("".join(buffered[ids[shown]]), end="", flush=True)
            buffered[ids[shown]].clear()
            if ids[shown] not in done:
                break
            shown += 1
            print()
            if shown < len(ids) and len(prompts) > 1:
                print(f"\n>>> {prompts[shown]}\n", flush=True)
    for request_id in ids:
        engine.pop_completion(request_id)
    elapsed = time.perf_counter() - started
    print(f"\n[elastic-llm] {tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} tokens/s, "
          f"{len(prompts)} request{'s' if len(prompts) != 1 else ''} batched together)", file=sys.stderr)


def _int_list(text: str) -> tuple[int, ...]:
    """argparse type of ``--tensor 1,2,3``: comma-separated integers (signs: `ProfileSettings`)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _add_profile_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = sub.add_parser(
        "profile",
        help="time the engine on this machine and write a JSON profile for the cost model",
        description="Time one tensor rank's shard of a decoder layer (prefill and decode) for each "
                    "tensor degree and micro-batch size, the embedding/LM head, gloo all-reduces "
                    "and stage hops between processes; write the JSON that "
                    "MeasuredProfile.from_json reads and print a table (milliseconds).")
    cmd.add_argument("--model", default="smollm2-135m-instruct",
                     help="embedded model name, HF checkpoint directory or .gguf file")
    cmd.add_argument("--tensor", type=_int_list, default=None, metavar="M,M,...",
                     help="tensor degrees (default: 1 up to the KV heads, at most 4)")
    cmd.add_argument("--batch", type=_int_list, default=(1, 2, 4, 8), metavar="B,B,...",
                     help="micro-batch sizes (default: 1,2,4,8)")
    cmd.add_argument("--prefill-len", type=int, default=128, help="prompt tokens per request")
    cmd.add_argument("--context-len", type=int, default=128, help="cached tokens when decoding")
    cmd.add_argument("--repeats", type=int, default=5, help="timed repetitions (median kept)")
    cmd.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    cmd.add_argument("--comm-repeats", type=int, default=30,
                     help="timed repetitions of each communication measurement")
    cmd.add_argument("--threads", type=int, default=1,
                     help="torch threads per process (default 1: one worker process per core)")
    cmd.add_argument("--comm-timeout", type=float, default=120.0,
                     help="seconds a communication group may take")
    cmd.add_argument("--no-comm", action="store_true", help="skip all-reduce and stage-hop timing")
    cmd.add_argument("--warm-cache", action="store_true",
                     help="do not evict the CPU caches before each timed layer/head call")
    cmd.add_argument("--compare-engine", action="store_true",
                     help="also time LLMEngine decode steps (M=1) against the profile's prediction")
    cmd.add_argument("--output", default=None,
                     help="JSON file to write (default: MODEL-profile.json here)")


def _profile(args: argparse.Namespace) -> None:
    """Run ``elastic-llm profile``: progress on stderr, the table on stdout, the JSON to a file."""
    from dataclasses import replace

    from elastic_llm.profiling import ProfileSettings, format_table, profile_model, write_profile

    settings = ProfileSettings(
        tensor_degrees=args.tensor, batch_sizes=args.batch, prefill_len=args.prefill_len,
        context_len=args.context_len, repeats=args.repeats, warmup=args.warmup,
        comm_repeats=args.comm_repeats, threads=args.threads, measure_comm=not args.no_comm,
        comm_timeout=args.comm_timeout, flush_cache=not args.warm_cache)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = profile_model(args.model, settings, progress)
    if args.compare_engine:
        from elastic_llm.planning.measured import MeasuredProfile
        from elastic_llm.profiling.engine_check import compare_decode_step

        checks = compare_decode_step(args.model, MeasuredProfile.from_json(result.to_json_dict()),
                                     result.settings.batch_sizes, result.settings.context_len,
                                     threads=result.settings.threads,
                                     flush_cache=result.settings.flush_cache, progress=progress)
        result = replace(result, engine_check=checks)
    path = write_profile(result, args.output or f"{result.model_name}-profile.json")
    print(format_table(result))
    print(f"[elastic-llm] profile written to {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `elastic-llm` console script."""
    parser = argparse.ArgumentParser(prog="elastic-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "stream an answer to PROMPT"),
                            ("demo", "serve on a local Dask cluster while a spot worker is preempted "
                                     "and another joins (--local: one engine, no cluster)")):
        cmd = sub.add_parser(name, help=help_text)
        if name == "generate":
            cmd.add_argument("prompt", nargs="+", help="the prompt(s)")
            cmd.add_argument("--raw", action="store_true", help="do not apply the chat template")
        else:
            cmd.add_argument("--local", action="store_true",
                             help="stream a few answers from one in-process engine instead")
            cmd.add_argument("--grace", type=float, default=6.0, help="preemption grace period (s)")
        cmd.add_argument("--model", default="smollm2-135m-instruct",
                         help="embedded model name, HF checkpoint directory or .gguf file")
        cmd.add_argument("--max-new-tokens", type=int, default=128)
        cmd.add_argument("--temperature", type=float, default=0.0)
        cmd.add_argument("--seed", type=int, default=None)
        cmd.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    _add_profile_parser(sub)
    from elastic_llm.serve.cli import add_serve_parser, run_serve

    add_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            _profile(args)
            return 0
        if args.command == "serve":
            return run_serve(args, parser)
        from elastic_llm.sampling import SamplingParams

        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        if args.command == "demo" and not args.local:
            from elastic_llm.cluster.demo import run_demo

            run_demo(args.model, max_new_tokens=args.max_new_tokens, grace_s=args.grace)
            return 0
        engine = _engine(args.model, args.threads)
        prompts = DEMO_PROMPTS if args.command == "demo" else args.prompt
        chat = args.command == "demo" or not args.raw
        _stream(engine, prompts, args.max_new_tokens, args.temperature, args.seed, chat)
    except ElasticLLMError as exc:
        print(f"elastic-llm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
