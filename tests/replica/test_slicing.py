"""Partition, weights by slice and KV by slice, in one process (no workers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elastic_llm.engine.replica.kv import merge_kv, slice_kv
from elastic_llm.engine.replica.layout import replica_layouts, shard_layout
from elastic_llm.engine.replica.pieces import WeightPieces, piece_shape, slice_pieces
from elastic_llm.engine.replica.sharded_executor import split_micro_batches
from elastic_llm.engine.executor import StepWork
from elastic_llm.model.kv_cache import KVState
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.loader import build_rotary, read_config
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights
from elastic_llm.planning import SliceAlgebra
from tests.replica.conftest import config

#: SmolLM2-135M's shapes (9 heads, 3 KV heads, head dim 64), for shard sizes only.
SMOLLM2 = ModelSpec(name="smollm2", model_type="llama", num_layers=30, hidden_size=576,
                    num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, tie_word_embeddings=True)


def test_tensor_shards_are_autotp_sizes_and_tile_every_dimension() -> None:
    # AutoTP sizes for SmolLM2 from deepspeed.module_inject.tp_shard.get_shard_size_list
    # (docs/ANCHORS): M=2 q [384, 192], k/v [128, 64], MLP [768, 768]; M=4 q [192, 192, 192, 0]
    sizes = {m: [shard_layout(SMOLLM2, 1, m, 0, r).shard for r in range(m)] for m in (1, 2, 3, 4)}
    assert [(s.heads[1] - s.heads[0]) * 64 for s in sizes[2]] == [384, 192]
    assert [(s.kv_heads[1] - s.kv_heads[0]) * 64 for s in sizes[2]] == [128, 64]
    assert [s.intermediate[1] - s.intermediate[0] for s in sizes[2]] == [768, 768]
    assert [(s.heads[1] - s.heads[0]) * 64 for s in sizes[3]] == [192, 192, 192]
    assert [(s.heads[1] - s.heads[0]) * 64 for s in sizes[4]] == [192, 192, 192, 0]
    assert [s.intermediate[1] - s.intermediate[0] for s in sizes[4]] == [384] * 4
    for shards in sizes.values():
        for field, total in (("heads", 9), ("kv_heads", 3), ("intermediate", 1536), ("vocab", 49152)):
            ranges = [getattr(s, field) for s in shards]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        for s in shards:  # query heads follow their KV heads (GQA groups stay on one rank)
            assert (s.heads[0], s.heads[1]) == (3 * s.kv_heads[0], 3 * s.kv_heads[1])
    layouts = replica_layouts(SMOLLM2, config(4, 2))
    # Balanced by cost: SmolLM2's LM head (49152 x 576) costs about 8 layers, so the last stage
    # takes 2 layers + the head (about 10) and the others 10, 9, 9.
    assert [len(layouts[2 * s].layers) for s in range(4)] == [10, 9, 9, 2]
    assert layouts[0].has_embedding and not layouts[0].has_head and layouts[-1].has_head


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 3), (3, 4)])
def test_slice_pieces_add_up_to_the_slice_algebra_bytes(shape: tuple[int, int]) -> None:
    spec = ModelSpec(name="qwen-like", model_type="qwen2", num_layers=3, hidden_size=48, num_heads=6,
                     num_kv_heads=3, head_dim=8, intermediate_size=200, vocab_size=320,
                     attention_bias=True, tie_word_embeddings=False)
    algebra = SliceAlgebra(spec)
    shapes = WeightPieces(spec).shapes
    parallel = config(*shape)
    for position in parallel.positions():
        slices = algebra.weight_slices(parallel, position)
        for piece in slices:
            elements = sum(torch.Size(piece_shape(shapes, p)).numel()
                           for p in slice_pieces(spec, piece))
            assert elements * spec.bytes_per_param == algebra.nbytes(piece), piece
        held = sum(algebra.nbytes(s) for s in slices)
        assert held == algebra.weight_bytes(parallel, position.stage, position.rank)


def _network(checkpoint: Path, stages: int, degree: int, stage: int, rank: int,
             weights: SafetensorsWeights | WeightPieces) -> LlamaNetwork:
    hf_config = read_config(checkpoint)
    spec = ModelSpec.from_hf_config(hf_config)
    layout = shard_layout(spec, stages, degree, stage, rank)
    network = LlamaNetwork(spec, build_rotary(hf_config, spec), layers=layout.layers,
                           shard=layout.shard, has_embedding=layout.has_embedding,
                           has_head=layout.has_head)
    network.load(weights)  # type: ignore[arg-type]
    return network


def test_shards_assembled_from_other_shards_equal_checkpoint_shards(uneven_checkpoint: Path) -> None:
    checkpoint = SafetensorsWeights(uneven_checkpoint)
    # every tensor the (2, 2) shards hold, as views of their networks' parameters
    held = WeightPieces(ModelSpec.from_hf_config(read_config(uneven_checkpoint)))
    for stage in range(2):
        for rank in range(2):
            net = _network(uneven_checkpoint, 2, 2, stage, rank, checkpoint)
            held.merge(WeightPieces.from_network(net))
    for stage, rank in [(0, 0), (0, 2), (0, 1)]:  # (1, 3) shards: cut across the (2, 2) boundaries
        built = _network(uneven_checkpoint, 1, 3, stage, rank, held)
        direct = _network(uneven_checkpoint, 1, 3, stage, rank, checkpoint)
        for (name, a), (_, b) in zip(built.state_dict().items(), direct.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_kv_resliced_between_configurations_round_trips() -> None:
    generator = torch.Generator().manual_seed(0)
    layers, heads, length, d = 5, 3, 7, 4
    full = KVState(0, tuple(torch.randn(heads, length, d, generator=generator) for _ in range(layers)),
                   tuple(torch.randn(heads, length, d, generator=generator) for _ in range(layers)), length)
    spec = ModelSpec(name="kv", model_type="llama", num_layers=layers, hidden_size=heads * 2 * d,
                     num_heads=heads * 2, num_kv_heads=heads, head_dim=d, intermediate_size=64,
                     vocab_size=64)
    old = [slice_kv(full, lay.layers, lay.shard.kv_heads) for lay in replica_layouts(spec, config(2, 2))]
    new = [merge_kv(old, lay.layers, lay.shard.kv_heads, d) for lay in replica_layouts(spec, config(3, 3))]
    again = merge_kv(new, range(layers), (0, heads), d)
    assert all(torch.equal(a, b) for a, b in zip((*again.keys, *again.values),
                                                 (*full.keys, *full.values), strict=True))
    assert new[4].layer_start == 2 and new[4].head_start == 1 and new[4].keys[0].shape == (1, length, d)
    with pytest.raises(ValueError, match="not covered"):
        merge_kv(old[:1], range(layers), (0, heads), d)


def test_micro_batches_are_contiguous_non_empty_and_balanced() -> None:
    works = [StepWork(f"r{i}", (1,) * n, 0, True) for i, n in enumerate([20, 1, 1, 1, 1, 1])]
    batches = split_micro_batches(works, 2)
    assert [len(b.works) for b in batches] == [1, 5]
    assert [w for b in batches for w in b.works] == works
    assert len(split_micro_batches(works[:2], 4)) == 2
    assert [b.num_tokens for b in split_micro_batches(works[1:], 3)] == [2, 2, 1]


def test_an_empty_heads_block_needs_no_pieces_when_the_length_is_known() -> None:
    """A rank with no KV heads (M above the KV head count) gets its block from nothing."""
    block = merge_kv([], range(2, 4), (3, 3), head_dim=8, length=5)
    assert block.layer_start == 2 and block.length == 5 and len(block.keys) == 2
    assert all(tuple(k.shape) == (0, 5, 8) for k in (*block.keys, *block.values))
    with pytest.raises(ValueError, match="different lengths"):
        merge_kv([], range(2, 4), (3, 3), head_dim=8)
