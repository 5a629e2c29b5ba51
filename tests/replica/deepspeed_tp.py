"""One rank of `deepspeed.init_inference(tensor_parallel={"tp_size": N})` on CPU (run as a script).

Writes ``<out>/rank<r>.pt``: the shape of every parameter after AutoTP, and the logits of each
prompt. DeepSpeed on CPU needs accelerator "cpu", backend gloo and ``LOCAL_SIZE`` = world size
(otherwise its shm all-reduce segfaults). Its shm all-reduce op is not used: it is JIT-built with
ninja/g++ on first use (a minute or more on a fresh machine), and without it DeepSpeed all-reduces
through the gloo process group. What is compared is AutoTP's layout and outputs, not the transport.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", required=True, help="semicolon-separated comma-separated ids")
    args = parser.parse_args()
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank),
                      LOCAL_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port),
                      DS_ACCELERATOR="cpu")
    import importlib

    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    # gloo all-reduce, no JIT build of the shm op (`deepspeed.comm.torch` as an attribute is torch)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager").eval()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": args.world},
                                      dtype=torch.float32, replace_with_kernel_inject=False)
    shapes = {name: tuple(p.shape) for name, p in engine.module.named_parameters()}
    logits = []
    with torch.no_grad():
        for prompt in args.prompts.split(";"):
            ids = torch.tensor([[int(t) for t in prompt.split(",")]])
            logits.append(engine.module(ids).logits[0])
    torch.save({"shapes": shapes, "logits": logits}, Path(args.out) / f"rank{args.rank}.pt")


if __name__ == "__main__":
    main()
