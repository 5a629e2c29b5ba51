"""`ShardedExecutor` on tiny random checkpoints: token parity, reconfiguration, KV, failures."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica import (
    ReconfigurationReport,
    ReplicaConfigError,
    ReplicaWorkerError,
    ShardedExecutor,
)
from elastic_llm.engine.replica.layout import ShardLayout, shard_layout
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning import ParallelConfig
from elastic_llm.planning.slices import Part, Slice
from tests.replica.conftest import config

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model(uneven_checkpoint: Path) -> LoadedModel:
    return load_model(uneven_checkpoint)


@pytest.fixture(scope="module")
def executor(model: LoadedModel) -> Iterator[ShardedExecutor]:
    """One executor shared by the module's tests (each reconfigures it to what it needs)."""
    with ShardedExecutor(model, config(2, 2)) as shared:
        yield shared


@pytest.fixture(scope="module")
def expected(model: LoadedModel, prompts: list[list[int]], uneven_checkpoint: Path,
             reference_greedy: Callable[..., list[list[int]]]) -> list[tuple[int, ...]]:
    """The single-process engine's tokens, checked once against transformers."""
    local = [c.token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]
    assert [list(t) for t in local] == reference_greedy(uneven_checkpoint, prompts, NEW_TOKENS)
    return local


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 2), (3, 1)], ids=lambda s: f"P{s[0]}xM{s[1]}")
def test_greedy_tokens_equal_single_process_engine_and_transformers(
        executor: ShardedExecutor, model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]], shape: tuple[int, int]) -> None:
    executor.reconfigure(config(*shape))
    assert executor.parallel.shape == shape and len(executor.worker_pids()) == shape[0] * shape[1]
    engine = LLMEngine(model, executor=executor)
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == expected
    assert executor.kv_length("anything") == 0  # finished requests released their KV


def test_reconfigure_mid_generation_keeps_kv_and_moves_only_missing_slices(
        executor: ShardedExecutor, model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]]) -> None:
    executor.reconfigure(config(2, 2))
    engine = LLMEngine(model, executor=executor)
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, GREEDY)
    steps: list[list[StepWork]] = []
    execute = executor.execute
    executor.execute = lambda works: steps.append(list(works)) or execute(works)  # type: ignore[method-assign]
    try:
        for shape in [(1, 3), (3, 1), (1, 1)]:
            for _ in range(3):
                engine.step()
            lengths = {rid: executor.kv_length(rid) for rid in ids}
            old = [(name, layout) for name, layout in _layouts(executor)]
            report = executor.reconfigure(config(*shape))
            assert {rid: executor.kv_length(rid) for rid in ids} == lengths
            _check_only_missing_slices_moved(model.spec, report, dict(old), dict(_layouts(executor)),
                                             sum(lengths.values()))
            steps.clear()
            engine.step()  # continues from the kept KV: one new token per request, no recompute
            assert [len(w.token_ids) for w in steps[0]] == [1] * len(ids)
        while engine.has_unfinished():
            engine.step()
    finally:
        del executor.execute
    assert [engine.pop_completion(rid).token_ids for rid in ids] == expected


def test_export_and_resume_across_configurations(
        executor: ShardedExecutor, model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]]) -> None:
    executor.reconfigure(config(2, 2))
    source = LLMEngine(model, executor=executor)
    for i, prompt in enumerate(prompts):
        source.add_request(f"x{i}", prompt, GREEDY)
    for _ in range(4):
        source.step()
    states = [source.export_request(f"x{i}") for i in range(len(prompts))]
    assert all(s.kv is not None and len(s.kv.keys) == model.spec.num_layers for s in states)
    # the assembled KV equals what the single-process engine computes for the same tokens
    local = LLMEngine(model)
    local.resume_request(dataclasses.replace(states[0], kv=None))  # recomputes the same tokens
    local.step()
    reference = local.executor.export_kv("x0")
    assert reference is not None and states[0].kv is not None
    n = states[0].kv.length
    for ours, theirs in zip(states[0].kv.keys, reference.keys, strict=True):
        assert torch.allclose(ours, theirs[:, :n], atol=1e-5)
    executor.reconfigure(config(1, 3))
    target = LLMEngine(model, executor=executor)
    for state in states[:2]:
        target.resume_request(state)  # KV sliced out to the (1, 3) shards
    elsewhere = LLMEngine(model)  # and one resumed in a single process
    elsewhere.resume_request(states[2])
    results = {}
    for engine in (target, elsewhere):
        while engine.has_unfinished():
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = engine.pop_completion(output.request_id).token_ids
    assert [results[f"x{i}"] for i in range(len(prompts))] == expected


def test_invalid_configurations_are_refused_without_harm(executor: ShardedExecutor) -> None:
    running = executor.parallel
    with pytest.raises(ReplicaConfigError, match="one data-parallel replica"):
        executor.reconfigure(ParallelConfig(D=2, P=1, M=1, B=8))
    with pytest.raises(ReplicaConfigError, match="exceed the model's 3 layers"):
        executor.reconfigure(config(4, 1))
    assert executor.parallel == running
    assert executor.execute([StepWork("z", (1, 2), 0, True)]).shape == (1, 320)
    executor.release("z")


def test_untied_model_with_an_autotp_rank_holding_no_attention(
        tiny_checkpoint: Callable[[str], Path], prompts: list[list[int]],
        reference_greedy: Callable[..., list[list[int]]]) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")  # 2 KV heads: at M=3 rank 2 holds none
    model = load_model(checkpoint)
    want = reference_greedy(checkpoint, prompts, NEW_TOKENS)
    with ShardedExecutor(model, config(1, 3)) as sharded:
        assert shard_layout(model.spec, 1, 3, 0, 2).shard.num_kv_heads == 0
        engine = LLMEngine(model, executor=sharded)
        assert [list(c.token_ids) for c in engine.generate(prompts, GREEDY)] == want
        report = sharded.reconfigure(config(2, 2))
        assert report.checkpoint_bytes == 0 and report.weight_bytes > 0
        assert [list(c.token_ids) for c in engine.generate(prompts, GREEDY)] == want


def test_a_killed_worker_raises_promptly_and_close_does_not_hang(uneven_checkpoint: Path) -> None:
    sharded = ShardedExecutor(uneven_checkpoint, config(2, 1), timeout_s=30.0)
    try:
        sharded.execute([StepWork("a", (3, 4, 5), 0, True)])
        victim = sharded.placement.workers[1]
        os.kill(sharded.worker_pids()[victim] or 0, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(ReplicaWorkerError, match=victim):
            sharded.execute([StepWork("a", (6,), 3, True)])
        assert time.monotonic() - began < 10
        with pytest.raises(ReplicaWorkerError, match="failed earlier"):
            sharded.execute([StepWork("a", (6,), 3, True)])
    finally:
        pids = [pid for pid in sharded.worker_pids().values() if pid]
        began = time.monotonic()
        sharded.close()
        assert time.monotonic() - began < 20
    assert pids and not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------- bytes moved, brute force
def _layouts(executor: ShardedExecutor) -> list[tuple[str, ShardLayout]]:
    spec, parallel = executor.spec, executor.parallel
    return [(name, shard_layout(spec, parallel.P, parallel.M, pos.stage, pos.rank))
            for pos, name in executor.placement.items()]


def _units(spec: ModelSpec, layout: ShardLayout, tokens: int) -> dict[tuple[Any, ...], int]:
    """Every element-row a position holds, with its bytes: derived from the layout alone."""
    h, bpp, d = spec.hidden_size, spec.bytes_per_param, spec.head_dim
    shard, out = layout.shard, {}
    for layer in layout.layers:
        out.update({("q", layer, e): 2 * h * bpp for e in range(shard.heads[0] * d, shard.heads[1] * d)})
        kv = range(shard.kv_heads[0] * d, shard.kv_heads[1] * d)
        out.update({("kv", layer, e): 2 * h * bpp for e in kv})
        out.update({("cache", layer, e): 2 * bpp * tokens for e in kv})
        out.update({("mlp", layer, j): 3 * h * bpp for j in range(*shard.intermediate)})
        out[("norm", layer)] = 2 * h * bpp
    rows: set[int] = set(range(spec.vocab_size)) if layout.has_embedding else set()
    if layout.has_head:  # tied: the LM head rows are embedding rows, one tensor
        rows |= set(range(*shard.vocab_rows(spec.vocab_size)))
        out[("final_norm",)] = h * bpp
    out.update({("row", v): h * bpp for v in rows})
    return out


def _slice_units(piece: Slice) -> list[tuple[Any, ...]]:
    names = {Part.Q: "q", Part.KV: "kv", Part.MLP: "mlp", Part.KV_CACHE: "cache"}
    if piece.part in names:
        return [(names[piece.part], piece.layer, e) for e in range(piece.start, piece.stop)]
    if piece.part is Part.HEAD:
        return [("row", v) for v in range(piece.start, piece.stop)]
    return [{Part.NORM: ("norm", piece.layer), Part.FINAL_NORM: ("final_norm",)}[piece.part]]


def _check_only_missing_slices_moved(spec: ModelSpec, report: ReconfigurationReport,
                                     old: dict[str, ShardLayout], new: dict[str, ShardLayout],
                                     tokens: int) -> None:
    assert spec.tie_word_embeddings and not spec.attention_bias  # what `_units` models
    lacked: dict[str, dict[tuple[Any, ...], int]] = {}
    for name, layout in new.items():
        held = _units(spec, old[name], tokens) if name in old else {}
        lacked[name] = {u: b for u, b in _units(spec, layout, tokens).items() if u not in held}
    seen: set[tuple[str, tuple[Any, ...]]] = set()
    for t in report.transfers:
        assert t.src is not None  # every slice was held by a live worker: nothing from storage
        for unit in _slice_units(t.slice):
            assert unit in lacked[t.dst], f"{t.dst} already held {unit} (or does not need it)"
            assert (t.dst, unit) not in seen, f"{unit} sent twice to {t.dst}"
            seen.add((t.dst, unit))
    assert report.moved_bytes == sum(sum(units.values()) for units in lacked.values())
    assert report.kv_bytes > 0 and report.weight_bytes > 0
    assert report.received_bytes == report.moved_bytes  # what the workers actually received


def test_engine_parallel_option_and_reconfigure(model: LoadedModel, prompts: list[list[int]],
                                                expected: list[tuple[int, ...]]) -> None:
    """`LLMEngine(parallel=(P, M))` runs the sharded executor; `engine.reconfigure` switches it
    mid-generation and the continuations stay identical."""
    engine = LLMEngine(model, parallel=(1, 2))
    try:
        assert isinstance(engine.executor, ShardedExecutor) and engine.executor.parallel.M == 2
        for i, prompt in enumerate(prompts):
            engine.add_request(f"p{i}", prompt, GREEDY)
        for _ in range(4):
            engine.step()
        report = engine.reconfigure((2, 1))
        assert isinstance(report, ReconfigurationReport) and engine.executor.parallel.P == 2
        while engine.has_unfinished():
            engine.step()
        assert [engine.pop_completion(f"p{i}").token_ids for i in range(len(prompts))] == expected
        assert engine.stats().tokens_computed == sum(len(p) + NEW_TOKENS - 1 for p in prompts)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="cannot reconfigure"):
        LLMEngine(model).reconfigure((1, 2))
