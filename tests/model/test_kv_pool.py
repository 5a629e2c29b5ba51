"""The pooled KV layout (`KVPool`) and the batched decode attention over it, against private caches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.local_executor import LocalExecutor
from elastic_llm.model.kv_cache import KVCache, KVPool, KVState, PooledKVCache
from elastic_llm.model.layers import DecodeGroup, SequenceSlice
from elastic_llm.model.linear import Linear
from elastic_llm.model.loader import load_model

CPU = torch.device("cpu")


def _fill(cache: KVCache | PooledKVCache, layers: int, n: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    cache.reserve(n)
    for layer in range(layers):
        keys = torch.randn(2, n, 4, generator=generator)
        cache.write_and_read(layer, keys, keys + 1)
    cache.advance(n)


def test_pool_slots_growth_and_reuse_keep_contents() -> None:
    pool = KVPool(0, 3, 2, 4, torch.float32, CPU, slots=2, capacity=4, max_capacity=64)
    caches = [pool.allocate() for _ in range(3)]  # the third slot doubles the pool to 4 slots
    assert [c.slot for c in caches] == [0, 1, 2] and pool.slots == 4
    private = []
    for i, cache in enumerate(caches):
        _fill(cache, 3, 3 + i, seed=i)
        twin = KVCache(0, 3, 2, 4, torch.float32, CPU)
        _fill(twin, 3, 3 + i, seed=i)
        private.append(twin)
    assert pool.capacity >= 5  # grew (doubling) for the longest request
    for cache, twin in zip(caches, private, strict=True):
        got, want = cache.export(), twin.export()
        assert got.length == want.length
        for a, b in zip((*got.keys, *got.values), (*want.keys, *want.values), strict=True):
            assert torch.equal(a, b)
    caches[1].release()
    again = pool.allocate()
    assert again.slot == 1 and again.length == 0  # lowest free slot is reused
    adopted = pool.adopt(private[2])
    assert adopted.slot == 3 and torch.equal(adopted.export().keys[1], private[2].export().keys[1])
    for cache in (caches[0], caches[2], again, adopted):
        cache.release()
    assert pool.slots == 0 and pool.live == 0  # storage dropped when the last request leaves
    state = private[0].export()
    back = pool.adopt(state)
    assert back.length == state.length and torch.equal(back.export().values[2], state.values[2])


def test_pool_refuses_what_does_not_fit() -> None:
    pool = KVPool(0, 2, 1, 4, torch.float32, CPU, slots=1, capacity=4, max_capacity=8)
    cache = pool.allocate()
    cache.reserve(8)
    with pytest.raises(ValueError):
        cache.reserve(9)
    with pytest.raises(ValueError):
        pool.adopt(KVState(1, (torch.zeros(1, 2, 4),), (torch.zeros(1, 2, 4),), 2))


def _logits(network: torch.nn.Module, works: list[tuple[list[int], int]],
            caches: list[KVCache | PooledKVCache]) -> torch.Tensor:
    tokens, positions, seqs, rows = [], [], [], []
    for (ids, start), cache in zip(works, caches, strict=True):
        seqs.append(SequenceSlice(len(tokens), len(ids), cache))
        tokens.extend(ids)
        positions.extend(range(start, start + len(ids)))
        rows.append(len(tokens) - 1)
        cache.reserve(len(ids))
    out = network(torch.tensor(tokens), torch.tensor(positions), seqs, torch.tensor(rows))
    for seq in seqs:
        seq.cache.advance(seq.num_new)
    return out


@pytest.mark.parametrize(("name", "paused_between"), [("llama-gqa-untied", 0), ("mistral-window", 0),
                                                     ("llama-odd-mqa", 0), ("llama-gqa-untied", 2),
                                                     ("mistral-window", 2)])
def test_batched_decode_matches_private_caches(name: str, paused_between: int,
                                               tiny_checkpoint: Callable[[str], Path]) -> None:
    """`paused_between` idle slots after each member (a preemptive scheduler's paused requests):
    with 2, the members span 10 slots and are gathered instead of attended over the range."""
    model = load_model(tiny_checkpoint(name))
    spec, network = model.spec, model.network
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (5, 11, 3, 7)]
    pool = KVPool(0, spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32, CPU,
                  slots=2, capacity=4)
    filler = pool.allocate()  # slot 0 stays idle: the batch's slots are not a plain 0..n-1 range
    pooled: list[KVCache | PooledKVCache] = []
    idle = [filler]
    for _ in prompts:
        pooled.append(pool.allocate())
        idle += [pool.allocate() for _ in range(paused_between)]
    members = [SequenceSlice(i, 1, cache) for i, cache in enumerate(pooled)]
    group = DecodeGroup.build(members, None, len(members), CPU)
    assert group.gather == (paused_between > 0) and (group.span == 4 or not group.gather)
    private: list[KVCache | PooledKVCache] = [
        KVCache(0, spec.num_layers, spec.num_kv_heads, spec.head_dim, torch.float32, CPU) for _ in prompts]
    pooled[1], pooled[2] = pooled[2], pooled[1]  # rows in a different order than slots
    lengths = [len(p) for p in prompts]
    # prefill everyone, then decode; request 3 restarts a chunked prefill halfway (mixed pass)
    works = [(p, 0) for p in prompts]
    for step in range(14):
        want = _logits(network, works, private)
        got = _logits(network, works, pooled)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nxt = want.argmax(-1).tolist()
        works = [([t], n) for t, n in zip(nxt, lengths, strict=True)]
        lengths = [n + 1 for n in lengths]
        if step == 5:
            works[3] = ([1, 2, 3], lengths[3] - 1)
            lengths[3] += 2
    for cache in idle:
        cache.release()


def test_executor_spills_long_requests_and_keeps_tokens(tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [4]]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    plain = LLMEngine(checkpoint, executor=LocalExecutor(load_model(checkpoint).network,
                                                         load_model(checkpoint).spec, pool_max_positions=0))
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    model = load_model(checkpoint)
    executor = LocalExecutor(model.network, model.spec, pool_max_positions=16)
    engine = LLMEngine(model, executor=executor)
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected
    assert executor._pool is not None and executor._pool.live == 0


def test_executor_export_import_through_pool(tiny_checkpoint: Callable[[str], Path]) -> None:
    model = load_model(tiny_checkpoint("qwen2-bias"))
    executor = LocalExecutor(model.network, model.spec)
    executor.execute([StepWork("a", (1, 2, 3, 4), 0, True), StepWork("b", (7, 8), 0, True)])
    state = executor.export_kv("a")
    assert state is not None and state.length == 4
    executor.import_kv("c", state)
    exported = executor.export_kv("c")
    assert exported is not None
    for x, y in zip((*state.keys, *state.values), (*exported.keys, *exported.values), strict=True):
        assert torch.equal(x, y)
    first = executor.execute([StepWork("a", (5,), 4, True), StepWork("b", (9,), 2, True)])
    second = executor.execute([StepWork("c", (5,), 4, True)])
    torch.testing.assert_close(first[0], second[0], rtol=1e-5, atol=1e-5)
    for rid in ("a", "b", "c"):
        executor.release(rid)
    assert executor._pool is not None and executor._pool.live == 0


def test_packed_linear_follows_weight_changes() -> None:
    layer = Linear(8, 5)
    layer.weight.data = torch.randn(5, 8)
    x = torch.randn(3, 8)
    packed = layer.pack()
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place: the packed copy must not be used any more
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    layer.weight.data = torch.randn(5, 8)  # new data
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    assert packed in (True, False)


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_linear_adds_the_residual_with_the_same_sums(rows: int) -> None:
    """The residual added inside the packed multiply gives exactly `residual + linear(x)`, with
    and without a bias, packed or not; a residual of another shape is refused."""
    generator = torch.Generator().manual_seed(rows)
    for bias in (False, True):
        layer = Linear(24, 16, bias=bias)
        layer.weight.data = torch.randn(16, 24, generator=generator)
        if bias:
            layer.bias.data = torch.randn(16, generator=generator)  # type: ignore[union-attr]
        x, residual = torch.randn(rows, 24, generator=generator), torch.randn(rows, 16, generator=generator)
        for packed in (False, True):
            if packed:
                layer.pack()
            assert torch.equal(layer(x, residual), residual + layer(x))
        with pytest.raises(ValueError, match="residual of shape"):
            layer(x, torch.randn(rows + 1, 16))


def test_pool_keys_and_values_are_views_of_one_tensor() -> None:
    """One indexed write through `kv(layer)` stores keys and values; `keys`/`values`, export and
    growth see it."""
    pool = KVPool(2, 3, 2, 4, torch.float32, CPU, slots=1, capacity=4, max_capacity=64)
    cache = pool.allocate(3)
    written = torch.randn(1, 2, 2, 4)  # [members, keys/values, kv heads, head dim]
    pool.kv(3)[:, torch.tensor([cache.slot]), :, torch.tensor([0])] = written
    assert torch.equal(pool.keys(3)[cache.slot, :, 0], written[0, 0])
    assert torch.equal(pool.values(3)[cache.slot, :, 0], written[0, 1])
    cache.length = 1
    pool.allocate(40)  # grows slots and capacity: contents move with the storage
    state = cache.export()
    assert torch.equal(state.keys[1][:, 0], written[0, 0]) and torch.equal(state.values[1][:, 0], written[0, 1])


def test_a_cpu_pool_zero_fills_its_next_doubling_ahead_and_keeps_contents() -> None:
    pool = KVPool(0, 3, 2, 4, torch.float32, CPU, slots=4, capacity=8, max_capacity=64)
    caches = [pool.allocate() for _ in range(3)]  # half of 4 in use: the 8-slot storage is prepared
    for i, cache in enumerate(caches):
        _fill(cache, 3, 2 + i, seed=i)
    expected = [c.export() for c in caches]
    caches += [pool.allocate(), pool.allocate()]  # the fifth doubles the slots, from the spare
    assert pool.slots == 8 and (pool.growths, pool.growths_prepared) == (1, 1)
    for cache, state in zip(caches, expected):
        got = cache.export()
        assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, state.keys + state.values))
    assert not pool.kv(0)[:, 3:].any()  # new slots are zeros
    caches[0].reserve(20)  # a capacity growth (2 + 20 positions), with no spare being prepared
    assert pool.capacity == 22 and (pool.growths, pool.growths_prepared) == (2, 1)
    caches += [pool.allocate() for _ in range(4)]  # 9 of 8: doubles again, prepared at 22 positions
    assert pool.slots == 16 and (pool.growths, pool.growths_prepared) == (3, 2)
    assert torch.equal(caches[1].export().keys[0], expected[1].keys[0])
    # 9 of 16 slots in use prepared 32 x 22; a reservation of 3 + 15 = 18 >= 3/4 of 22 positions
    # widens the spare to 32 x 44, and the capacity growth that follows takes it whole
    caches[1].reserve(15)
    caches[1].reserve(25)
    assert (pool.slots, pool.capacity) == (32, 44) and (pool.growths, pool.growths_prepared) == (4, 3)
    got = caches[2].export()
    assert torch.equal(got.values[2], expected[2].values[2]) and not pool.kv(1)[:, 9:].any()
