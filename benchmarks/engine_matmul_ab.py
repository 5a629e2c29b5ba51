"""The engine with our packed multiply against the same engine with oneDNN's, in one process.

Both packed copies of every weight are kept (on huge pages); rounds alternate between them, each
a cold batch of `--batch` distinct chat prompts x 64 new greedy tokens, as in
`engine_throughput.py`. Prints every round, each kind's best, and whether both kinds give the
same greedy tokens (8 prompts x 32 tokens).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engine_matmul_ab.py [--rounds 6] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.model import huge_pages
from elastic_llm.model.linear import Linear, _Packed, _weight_key
from elastic_llm.model.loader import load_model
from engine_throughput import PrefixCaching, TokenClock, distinct_prompts, ours_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(load_model("smollm2-135m-instruct"))
    network = engine.model.network
    if network.packed_pages is not None:
        network.packed_pages.wait()
    layers = [m for m in network.modules() if isinstance(m, Linear)]
    if any(layer.packed_kind != "panels" for layer in layers):
        raise SystemExit("the engine did not pack into panels here (no kernels, or no AVX2+FMA)")
    packed = {"panels": [layer._packed for layer in layers]}
    with huge_pages.backing_new_memory(background=False) as collapse:
        packed["onednn"] = [_Packed(_weight_key(layer.weight), "onednn",
                                    torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 32))
                            for layer in layers]
    if collapse:
        collapse[0].wait()

    def use(kind: str) -> None:
        for layer, copy in zip(layers, packed[kind], strict=True):
            layer._packed = copy

    batch = distinct_prompts(engine, args.batch)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    prefixes = PrefixCaching(engine)
    runs: dict[str, list[float]] = {"panels": [], "onednn": []}
    for round_ in range(args.rounds):
        for kind in ("onednn", "panels") if round_ % 2 else ("panels", "onednn"):
            use(kind)
            prefixes.set("off")
            engine.generate(batch[:1], SamplingParams(max_new_tokens=2))  # warm-up, caching nothing
            prefixes.set("cold")
            clock = TokenClock()
            started = time.perf_counter()
            ours_generate(engine, batch, params, clock)
            runs[kind].append(args.batch * 64 / (time.perf_counter() - started))
            print(f"round {round_} {kind:>6}: {runs[kind][-1]:6.1f} tok/s, decode only {clock.decode_tok_s():6.1f}",
                  flush=True)
    tokens = {}
    for kind in packed:
        use(kind)
        tokens[kind] = [c.token_ids for c in engine.generate(batch[:8], SamplingParams(max_new_tokens=32))]
    use("panels")
    best = {kind: max(values) for kind, values in runs.items()}
    print(f"best: panels {best['panels']:.1f}, onednn {best['onednn']:.1f} tok/s "
          f"({best['panels'] / best['onednn']:.2f}x); same greedy tokens: {tokens['panels'] == tokens['onednn']}")


if __name__ == "__main__":
    main()
