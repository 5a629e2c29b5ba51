"""Our AutoTP layout against DeepSpeed's own: `deepspeed.init_inference(tensor_parallel={"tp_size": 2})`
in two CPU processes (gloo) on the same tiny model: shard shapes and outputs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica.layout import shard_layout
from elastic_llm.engine.replica.pieces import WeightPieces
from elastic_llm.engine.replica.sharded_executor import ShardedExecutor
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.loader import load_model
from elastic_llm.model.weights import SafetensorsWeights
from elastic_llm.planning.slices import shard_sizes
from tests.replica.conftest import config

PROMPTS = ([5, 17, 33, 2, 250, 8, 91], [300, 4, 4])
_SCRIPT = Path(__file__).with_name("deepspeed_tp.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deepspeed_tp2(uneven_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each rank's parameter shapes and logits under DeepSpeed AutoTP, tp_size 2."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    port = _free_port()
    prompts = ";".join(",".join(map(str, p)) for p in PROMPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(_SCRIPT), "--checkpoint", str(uneven_checkpoint),
                               "--rank", str(r), "--world", "2", "--port", str(port), "--out", str(out),
                               "--prompts", prompts], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:  # importing DeepSpeed and transformers in two processes: 10-40 s here
        logs = [p.communicate(timeout=240)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for p, log in zip(ranks, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_shard_shapes_equal_deepspeed_autotp(uneven_checkpoint: Path, deepspeed_tp2: list[dict]) -> None:
    model = load_model(uneven_checkpoint, load_tokenizer=False)
    spec = model.spec
    for rank, theirs in enumerate(deepspeed_tp2):
        layout = shard_layout(spec, 1, 2, 0, rank)
        network = LlamaNetwork(spec, model.network.rotary, shard=layout.shard)
        network.load(SafetensorsWeights(uneven_checkpoint))
        ours = {piece.name: tuple(t.shape) for piece, t in WeightPieces.from_network(network).items()}
        compared = 0
        for name, shape in theirs["shapes"].items():
            if name.startswith("model.layers."):
                assert ours[name] == shape, (rank, name)
                compared += 1
        assert compared == spec.num_layers * 9
        # uneven on purpose: rank 0 has 2 of 3 KV heads and 2 of 3 MLP granules
        assert theirs["shapes"]["model.layers.0.self_attn.k_proj.weight"][0] == (16, 8)[rank]
        assert theirs["shapes"]["model.layers.0.mlp.down_proj.weight"][1] == (128, 64)[rank]
        # documented difference: DeepSpeed's inference LM head splits the hidden (input) dimension
        # and all-reduces the logits; ours (and the slice algebra) splits vocabulary rows
        hidden_cut = shard_sizes(spec.hidden_size, 2)[rank]
        assert theirs["shapes"]["lm_head.weight"] == (spec.vocab_size, hidden_cut)
        assert tuple(network.lm_head.weight.shape) == (shard_sizes(spec.vocab_size, 2)[rank],
                                                       spec.hidden_size)


def test_outputs_equal_deepspeed_autotp(uneven_checkpoint: Path, deepspeed_tp2: list[dict]) -> None:
    with ShardedExecutor(uneven_checkpoint, config(1, 2)) as executor:
        for i, prompt in enumerate(PROMPTS):
            ours = executor.execute([StepWork(f"p{i}", tuple(prompt), 0, True)])[0]
            theirs = deepspeed_tp2[0]["logits"][i][-1]
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
            assert int(ours.argmax()) == int(theirs.argmax())
            assert torch.equal(deepspeed_tp2[1]["logits"][i], deepspeed_tp2[0]["logits"][i])
