"""Batched decode attention over a range of pool slots against over the members' gathered slots.

A preemptive scheduler keeps paused requests' KV in their pool slots, so the running members of a
decode batch can be spread over a wide range of slots. `DecodeGroup` (elastic_llm/model/layers.py)
attends over the range as views, or, once the range is `GATHER_SPAN_FACTOR` times the members,
over a gathered copy of the members' slots. This times both ways with the same ops, at SmolLM2's
attention shape (30 layers, 3 KV heads of 64, 3 query heads per KV head), one torch thread.

Run:  .venv/bin/python benchmarks/decode_span_gather.py [--length 200] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

LAYERS, KV_HEADS, GROUP, HEAD_DIM, CAPACITY = 30, 3, 3, 64, 256
CASES = ((4, 4), (4, 6), (4, 8), (4, 12), (4, 30), (16, 24), (16, 40))  #: (members, range of slots)


def step_ms(members: int, span: int, length: int, gather: bool, repeats: int) -> float:
    """Milliseconds of one decode step's attention over all layers."""
    pool = torch.zeros(LAYERS, 2, 64, KV_HEADS, CAPACITY, HEAD_DIM)
    slots = torch.linspace(0, span - 1, members).round().long()
    q = torch.randn(members, KV_HEADS, GROUP, HEAD_DIM)
    rows = members if gather else span
    bias = torch.zeros(rows * KV_HEADS, GROUP, length)

    def run() -> None:
        for layer in range(LAYERS):
            kv = pool[layer]
            index = slots if gather else slice(0, span)
            keys = kv[0, index, :, :length].reshape(rows * KV_HEADS, length, HEAD_DIM)
            values = kv[1, index, :, :length].reshape(rows * KV_HEADS, length, HEAD_DIM)
            grouped = q if gather else q.new_zeros(span, KV_HEADS, GROUP, HEAD_DIM).index_copy_(0, slots, q)
            scores = torch.baddbmm(bias, grouped.reshape(rows * KV_HEADS, GROUP, HEAD_DIM), keys.transpose(1, 2),
                                   alpha=HEAD_DIM ** -0.5)
            out = torch.bmm(torch.softmax(scores, -1), values).view(rows, KV_HEADS, GROUP, HEAD_DIM)
            if not gather:
                out.index_select(0, slots)

    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return 1000 * (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=200, help="positions attended per slot")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.length <= CAPACITY or args.repeats < 1:
        parser.error(f"--length in 1..{CAPACITY}, --repeats >= 1")
    torch.set_num_threads(1)
    for members, span in CASES:
        over_range = step_ms(members, span, args.length, False, args.repeats)
        gathered = step_ms(members, span, args.length, True, args.repeats)
        print(f"{members:2d} members over {span:2d} slots: range {over_range:6.1f} ms, gathered {gathered:6.1f} ms "
              f"(range / gathered {over_range / gathered:.2f})", flush=True)


if __name__ == "__main__":
    main()
