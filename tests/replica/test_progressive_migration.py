"""Progressive, memory-bounded reconfiguration of a live sharded replica, and its ablations.

The shards measure the bytes they really hold (distinct tensor storages of weights + KV) at every
step of the migration; the report carries the peak per worker and when each new stage was built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica import ReconfigurationReport, ReplicaConfigError, ShardedExecutor
from elastic_llm.model.loader import LoadedModel, load_model
from tests.replica.conftest import config

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
#: bytes per shard: the (1, 2) -> (2, 1) move of the tiny model fits it only when old slices are
#: freed on the way (the worker that becomes stage 0 holds about 460 kB at its peak otherwise)
BOUND = 400_000


@pytest.fixture(scope="module")
def model(uneven_checkpoint: Path) -> LoadedModel:
    return load_model(uneven_checkpoint)


@pytest.fixture(scope="module")
def expected(model: LoadedModel, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    return [c.token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]


@pytest.fixture
def executor(model: LoadedModel) -> Iterator[ShardedExecutor]:
    with ShardedExecutor(model, config(1, 2)) as fresh:
        yield fresh


def _switch_mid_generation(engine: LLMEngine, executor: ShardedExecutor, prompts: list[list[int]],
                           shape: tuple[int, int], **options: object
                           ) -> tuple[ReconfigurationReport, list[tuple[int, ...]]]:
    """Generate `prompts`, reconfiguring to `shape` with `options` after three steps."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, GREEDY)
    for _ in range(3):
        engine.step()
    report = executor.reconfigure(config(*shape), **options)  # type: ignore[arg-type]
    while engine.has_unfinished():
        engine.step()
    return report, [engine.pop_completion(rid).token_ids for rid in ids]


@pytest.mark.parametrize("progressive", [True, False], ids=["progressive", "all-first"])
def test_a_tight_memory_bound_holds_at_every_step_only_when_old_slices_are_freed(
        executor: ShardedExecutor, model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]], progressive: bool) -> None:
    engine = LLMEngine(model, executor=executor)
    report, tokens = _switch_mid_generation(engine, executor, prompts, (2, 1),
                                            progressive=progressive, memory_bytes=BOUND)
    assert tokens == expected and report.kv_bytes > 0 and report.weight_bytes > 0
    peak = report.peak_bytes
    assert set(peak) == set(executor.placement.workers)
    assert all(peak[w] >= report.start_bytes[w] > 0 for w in peak)  # measured, not zero
    if progressive:
        assert report.memory_bytes == {w: BOUND for w in peak}
        assert max(peak.values()) <= BOUND
        assert max(report.planned_peak_bytes.values()) <= BOUND
    else:  # everything moves before anything is freed: old + new at once breaks the bound
        assert report.memory_bytes == {}
        assert max(peak.values()) > BOUND
        # the measured peak is the old holding plus all it received
        (heavy,) = [w for w in peak if peak[w] > BOUND]
        received = sum(t.nbytes for t in report.transfers if t.dst == heavy)
        assert peak[heavy] >= report.start_bytes[heavy] + received - 20_000  # spare KV capacity


def test_a_bound_no_order_can_keep_is_refused_and_the_replica_keeps_running(
        executor: ShardedExecutor) -> None:
    assert executor.execute([StepWork("z", (1, 2, 3), 0, True)]).shape == (1, 320)
    with pytest.raises(ReplicaConfigError, match="memory bound"):
        executor.reconfigure(config(2, 1), memory_bytes=250_000)
    assert executor.parallel.shape == (1, 2) and executor.kv_length("z") == 3
    assert executor.execute([StepWork("z", (4,), 3, True)]).shape == (1, 320)


def test_each_stage_is_built_as_soon_as_its_layers_land(
        model: LoadedModel, prompts: list[list[int]], expected: list[tuple[int, ...]]) -> None:
    """(1, 1) -> (3, 1) on three shards. The old whole-model shard keeps one stage and is rebuilt
    as soon as the KV has moved, before any layer; stage 0 is rebuilt once its layers have landed
    while stage 1's still move, and so on front to back. Not progressive: every stage waits for
    the last transfer."""
    with ShardedExecutor(model, config(1, 1)) as executor:
        (old,) = executor.placement.workers
        engine = LLMEngine(model, executor=executor)
        report, tokens = _switch_mid_generation(engine, executor, prompts, (3, 1))
        assert tokens == expected
        ready, transfers = report.stage_ready, report.transfers
        assert [s.stage for s in ready] == [0, 1, 2]
        assert all(s.after >= s.planned_after for s in ready)
        into = {s: [i for i, t in enumerate(transfers) if t.dst == executor.placement.workers[s]]
                for s in range(3)}
        kept = executor.placement.workers.index(old)  # the stage the old shard holds now
        fresh = sorted(s for s in range(3) if s != kept)
        first_weight = min(i for i, t in enumerate(transfers) if not t.slice.is_kv)
        assert not into[kept] and ready[kept].after < first_weight  # only its KV had to go first
        assert ready[fresh[0]].after == max(into[fresh[0]]) < max(into[fresh[1]])  # front first
        assert ready[fresh[1]].after == len(transfers) - 1
        assert ready[kept].later_transfers > ready[fresh[0]].later_transfers > 0
        # the old shard sends every layer, each only after it was rebuilt: a causal order in time
        assert ready[kept].seconds < ready[fresh[0]].seconds
        # it freed what it sent: it ends far below where it started
        assert report.end_bytes[old] < report.start_bytes[old] / 2

        executor.reconfigure(config(1, 1), workers=[old])
        report, tokens = _switch_mid_generation(engine, executor, prompts, (3, 1), progressive=False)
        assert tokens == expected
        assert [s.after for s in report.stage_ready] == [len(report.transfers) - 1] * 3
        assert all(s.later_transfers == 0 for s in report.stage_ready)


def test_without_the_mapper_workers_take_positions_in_the_given_order(model: LoadedModel) -> None:
    """The same two shards named in swapped order: Kuhn-Munkres keeps every slice in place, the
    ablation swaps the stages and moves every slice."""
    with ShardedExecutor(model, config(2, 1)) as executor:
        a, b = executor.placement.workers
        executor.execute([StepWork("k", (5, 6, 7, 8), 0, True)])
        kept = executor.reconfigure(config(2, 1), workers=[b, a])
        assert kept.use_mapper and executor.placement.workers == (a, b)
        assert kept.moved_bytes == 0
        swapped = executor.reconfigure(config(2, 1), workers=[b, a], use_mapper=False)
        assert not swapped.use_mapper and executor.placement.workers == (b, a)
        assert swapped.weight_bytes > 0 and swapped.kv_bytes > 0 and swapped.checkpoint_bytes == 0
        assert executor.kv_length("k") == 4
        assert executor.execute([StepWork("k", (9,), 4, True)]).shape == (1, 320)
