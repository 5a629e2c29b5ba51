"""`elastic-llm` command line: generate (streaming) and the quickstart demo."""

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
          f"{len(prompts)} requests batched together)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `elastic-llm` console script."""
    parser = argparse.ArgumentParser(prog="elastic-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "stream an answer to PROMPT"),
                            ("demo", "stream answers to a few prompts, batched together")):
        cmd = sub.add_parser(name, help=help_text)
        if name == "generate":
            cmd.add_argument("prompt", nargs="+", help="the prompt(s)")
            cmd.add_argument("--raw", action="store_true", help="do not apply the chat template")
        cmd.add_argument("--model", default="smollm2-135m-instruct",
                         help="embedded model name, HF checkpoint directory or .gguf file")
        cmd.add_argument("--max-new-tokens", type=int, default=128)
        cmd.add_argument("--temperature", type=float, default=0.0)
        cmd.add_argument("--seed", type=int, default=None)
        cmd.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        from elastic_llm.sampling import SamplingParams

        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
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
