"""Our packed fp32 multiply (`cpu_ops.linear`) against oneDNN's packed path, on SmolLM2's shapes.

For each batch size M, every weight shape of a SmolLM2-135M forward pass (q/k/v, o, gate/up,
down, lm_head) is multiplied by both kernels, alternating, and each keeps its best time. The
layer weights are 30 distinct copies, so they stream from memory as in a real decode step (the
lm_head is one matrix of 113 MB). Both kernels' packed weights are on huge pages, as in the
engine. The summary line is the sum over one forward pass's multiplies (30 layers + lm_head).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/linear_kernel.py [--rows 1,8,16,32,64,512]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from elastic_llm.model import cpu_ops, huge_pages

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  #: (out, in) of each SmolLM2-135M matrix
LAYERS = 30


def seconds(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,32,64,512")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = cpu_ops.kernels()
    if module is None or not module.packed_linear_available():
        raise SystemExit("the packed multiply is not available here (no kernels, or no AVX2+FMA)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}", flush=True)
    generator = torch.Generator().manual_seed(0)
    weights = {name: [torch.randn(n, k, generator=generator) for _ in range(1 if name == "lm_head" else LAYERS)]
               for name, (n, k) in SHAPES.items()}
    with huge_pages.backing_new_memory(background=False) as collapse:
        onednn = {name: [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in ws] for name, ws in weights.items()}
        panels = {name: [cpu_ops.pack_linear(w) for w in ws] for name, ws in weights.items()}
    if collapse:
        collapse[0].wait()
    for rows in (int(r) for r in args.rows.split(",")):
        totals = {"onednn": 0.0, "ours": 0.0}
        parts = []
        for name, (n, k) in SHAPES.items():
            x = torch.randn(rows, k, generator=generator)
            kernels = {
                "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                   for p in onednn[name]],  # noqa: B023
                "ours": lambda: [cpu_ops.linear(x, p, n) for p in panels[name]],  # noqa: B023
            }
            rounds = 3 if rows > 100 else (12 if name != "lm_head" else 40)
            for fn in kernels.values():
                fn()  # warm-up
            best = {key: float("inf") for key in kernels}
            for _ in range(rounds):  # alternate, so both see the same machine
                for key, fn in kernels.items():
                    best[key] = min(best[key], seconds(fn))
            copies = len(weights[name])
            flops = 2 * rows * n * k
            for key in kernels:
                totals[key] += best[key] / copies * (1 if name == "lm_head" else LAYERS)
            parts.append(f"{name} {flops * copies / best['onednn'] / 1e9:.0f}/"
                         f"{flops * copies / best['ours'] / 1e9:.0f}")
        print(f"M={rows:>3}: forward-pass multiplies onednn {totals['onednn'] * 1e3:7.1f} ms, "
              f"ours {totals['ours'] * 1e3:7.1f} ms ({totals['onednn'] / totals['ours']:.2f}x) | "
              f"GFLOP/s onednn/ours: {'  '.join(parts)}", flush=True)


if __name__ == "__main__":
    main()
