"""`DaskShardedExecutor`: a P x M replica whose shards are `ShardActor`s on real Dask worker processes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.cluster.dask_sharded import DaskShardedExecutor, rendezvous_host
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica import ReplicaConfigError, ReplicaWorkerError
from elastic_llm.model.loader import LoadedModel, load_model
from tests.cluster.helpers import local_cluster, wait_for
from tests.conftest import build_tiny_checkpoint
from tests.replica.conftest import UNEVEN_TIED, config

NEW_TOKENS = 10
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def uneven_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sharded-replica tests' checkpoint: uneven AutoTP shards, tied embeddings, 3 layers."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("uneven-tied"), "uneven-tied", seed=1,
                                 fields=UNEVEN_TIED)


@pytest.fixture(scope="module")
def model(uneven_checkpoint: Path) -> LoadedModel:
    return load_model(uneven_checkpoint)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Three prompts of different lengths (token ids < 320)."""
    return [[17, 3, 250, 41, 9], [88, 1, 5, 300, 12, 64, 7, 199, 23, 2, 76, 140, 31], [45, 6]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Client, list[str]]]:
    """Two worker processes (the kill test, last in this module, loses one of them)."""
    with local_cluster(2, processes=True) as (_, client):
        yield client, sorted(client.scheduler_info()["workers"])


@pytest.fixture(scope="module")
def expected(model: LoadedModel, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    return [c.token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]


def _dashboard(address: str) -> list[str]:
    """The Streamlit monitor's subheaders for the controller at `address` (no errors allowed)."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(Path(__file__).parents[2] / "dashboards" / "app.py"), default_timeout=60)
    app.run()
    app.sidebar.text_input[0].set_value(address)
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    return [header.value for header in app.subheader]


def _preempt_mid_generation(llm: ServingClient, prompts: list[list[int]], new_tokens: int, worker: str,
                            grace_s: float) -> tuple[list, dict]:  # type: ignore[type-arg]
    """Generate `prompts`; once two tokens per prompt are committed, preempt `worker` with
    `grace_s` of notice. Returns the results and the final status."""
    futures = llm.map(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
    assert llm.preempt(worker, grace_s=grace_s) == "accepted"
    return [f.result(timeout=120) for f in futures], llm.status()


def _the_ready_replica(llm: ServingClient, timeout: float) -> dict:  # type: ignore[type-arg]
    """Wait until exactly one replica is ready; its status entry."""
    (replica,) = wait_for(lambda: [r for r in llm.status()["replicas"] if r["state"] == "ready"],
                          timeout=timeout)
    return replica  # type: ignore[no-any-return]


def _generate_with_reconfigurations(engine: LLMEngine, executor: DaskShardedExecutor,
                                    prompts: list[list[int]],
                                    moves: list[tuple[tuple[int, int], list[str]]]) -> list[tuple[int, ...]]:
    """Generate `prompts`, switching to each (shape, workers) of `moves` after two steps; every
    switch must keep all KV (the next step computes exactly one new token per request)."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, GREEDY)
    for shape, workers in moves:
        for _ in range(2):
            engine.step()
        lengths = {rid: executor.kv_length(rid) for rid in ids}
        report = executor.reconfigure(config(*shape), workers=workers)
        assert executor.parallel.shape == shape and set(executor.placement.workers) == set(workers)
        assert {rid: executor.kv_length(rid) for rid in ids} == lengths
        assert report.checkpoint_bytes == 0 and report.kv_bytes > 0  # all from live shards
        assert report.received_bytes == report.moved_bytes
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_completion(rid).token_ids for rid in ids]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("shape", [(1, 2), (2, 1)], ids=lambda s: f"P{s[0]}xM{s[1]}")
def test_greedy_tokens_equal_single_process_engine_across_two_workers(
        cluster: tuple[Client, list[str]], model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]], shape: tuple[int, int]) -> None:
    client, workers = cluster
    with DaskShardedExecutor(client, model, config(*shape), workers=workers, timeout_s=30) as executor:
        pids = executor.worker_pids()
        assert set(pids) == set(workers) and len(set(pids.values())) == 2
        assert os.getpid() not in pids.values()  # the shards run in the worker processes
        assert [c.token_ids for c in LLMEngine(model, executor=executor).generate(prompts, GREEDY)] \
            == expected
        assert all(d["kv_bytes"] == 0 for d in executor.describe())  # finished requests released


@pytest.mark.timeout(90)
def test_reconfigure_mid_generation_on_the_same_workers_keeps_kv(
        cluster: tuple[Client, list[str]], model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]]) -> None:
    client, workers = cluster
    with DaskShardedExecutor(client, model, config(2, 1), workers=workers, timeout_s=30) as executor:
        engine = LLMEngine(model, executor=executor)
        assert _generate_with_reconfigurations(engine, executor, prompts,
                                               [((1, 2), workers), ((2, 1), workers)]) == expected
        assert engine.stats().tokens_computed == sum(len(p) + NEW_TOKENS - 1 for p in prompts)
        assert executor.epoch == 3


@pytest.mark.timeout(90)
def test_a_noticed_worker_hands_over_its_slices_and_kv_before_leaving(
        cluster: tuple[Client, list[str]], model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]]) -> None:
    """(2, 1) on both workers -> (1, 1) on one (the other sends its layers and KV, then its shard
    stops) -> (1, 2) on both again (a fresh shard on the returning worker)."""
    client, (a, b) = cluster
    with DaskShardedExecutor(client, model, config(2, 1), workers=[a, b], timeout_s=30) as executor:
        engine = LLMEngine(model, executor=executor)
        assert _generate_with_reconfigurations(engine, executor, prompts,
                                               [((1, 1), [b]), ((1, 2), [a, b])]) == expected
        assert engine.stats().tokens_computed == sum(len(p) + NEW_TOKENS - 1 for p in prompts)


@pytest.mark.timeout(60)
def test_unknown_workers_and_short_worker_lists_are_refused(
        cluster: tuple[Client, list[str]], model: LoadedModel) -> None:
    client, workers = cluster
    assert rendezvous_host(client) == "127.0.0.1"
    with pytest.raises(ReplicaConfigError, match="not workers of this cluster"):
        DaskShardedExecutor(client, model, config(1, 1), workers=["tcp://127.0.0.1:9"])
    with pytest.raises(ReplicaConfigError, match="needs 2 workers"):
        DaskShardedExecutor(client, model, config(2, 1), workers=workers[:1])


@pytest.mark.timeout(90)
def test_a_progressive_reshard_on_dask_keeps_every_shard_within_a_tight_memory_bound(
        cluster: tuple[Client, list[str]], model: LoadedModel, prompts: list[list[int]],
        expected: list[tuple[int, ...]]) -> None:
    """(1, 2) -> (2, 1) mid-generation under 400 kB per shard: the shard that becomes stage 0
    would hold about 460 kB if it kept its old slices until the end (see tests/replica's
    test_progressive_migration); the measured peak stays within the bound, stage by stage."""
    client, workers = cluster
    bound = 400_000
    with DaskShardedExecutor(client, model, config(1, 2), workers=workers, timeout_s=30) as executor:
        engine = LLMEngine(model, executor=executor)
        ids = [f"m{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, prompt, GREEDY)
        for _ in range(3):
            engine.step()
        report = executor.reconfigure(config(2, 1), workers=workers, memory_bytes=bound)
        while engine.has_unfinished():
            engine.step()
        assert [engine.pop_completion(rid).token_ids for rid in ids] == expected
    assert report.memory_bytes == {w: bound for w in workers} and report.kv_bytes > 0
    assert set(report.peak_bytes) == set(workers) and 0 < max(report.peak_bytes.values()) <= bound
    assert [s.stage for s in report.stage_ready] == [0, 1]
    assert all(s.after >= s.planned_after for s in report.stage_ready)
    from elastic_llm.control.messages import ReshardSummary

    # what ReplicaActor.reshard hands the controller, typed
    summary = ReshardSummary.from_wire({**report.summary(), "shards": list(workers)})
    assert summary.peak_bytes == dict(report.peak_bytes) and summary.progressive is True
    assert [s.stage for s in summary.stage_ready] == [0, 1]


@pytest.mark.timeout(90)
def test_a_killed_shard_worker_raises_promptly_and_close_does_not_hang(
        cluster: tuple[Client, list[str]], uneven_checkpoint: Path) -> None:
    """Last in the module: it kills one of the two workers."""
    client, workers = cluster
    executor = DaskShardedExecutor(client, uneven_checkpoint, config(2, 1), workers=workers,
                                   timeout_s=15)
    try:
        assert executor.execute([StepWork("a", (3, 4, 5), 0, True)]).shape == (1, 320)
        victim = executor.placement.workers[1]
        os.kill(executor.worker_pids()[victim] or 0, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(ReplicaWorkerError, match=victim):
            executor.execute([StepWork("a", (6,), 3, True)])
        assert time.monotonic() - began < 10
        with pytest.raises(ReplicaWorkerError, match="failed earlier"):
            executor.execute([StepWork("a", (6,), 3, True)])
    finally:
        began = time.monotonic()
        executor.close()
        assert time.monotonic() - began < 10


@pytest.mark.timeout(150)
def test_controller_reshards_a_sharded_replica_when_a_shard_worker_gets_a_notice(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """One (2, 1) replica over two workers: a notice for the non-leader worker makes the controller
    switch it to (1, 1) on the leader mid-generation, KV carried over: nothing recomputed and the
    tokens equal the single-process engine's."""
    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7], [9, 9, 100, 2, 31, 4]]
    new_tokens = 40
    want = [c.token_ids for c in LLMEngine(model).generate(
        prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))]
    with local_cluster(2, processes=True) as (_, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel=(2, 1),
                                 min_step_seconds=0.03, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False) as llm:
            replica = _the_ready_replica(llm, timeout=90)
            assert list(replica["parallel"]) == [2, 1] and len(replica["shards"]) == 2
            leader = replica["worker"]
            (other,) = [w for w in replica["shards"] if w != leader]
            futures = llm.map(prompts, max_new_tokens=new_tokens, ignore_eos=True)
            wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
            assert llm.preempt(other, grace_s=20.0) == "accepted"
            results = [f.result(timeout=90) for f in futures]
            status = llm.status()
    assert [r.token_ids for r in results] == want
    (after,) = status["replicas"]
    assert list(after["parallel"]) == [1, 1] and list(after["shards"]) == [leader]
    assert status["tokens_recomputed"] == 0 and status["restarts"] == 0
    (notice,) = status["notices"]
    assert notice["worker"] == other and notice["migrated"] > 0 and notice["recomputed"] == 0
    assert status["kv_bytes_migrated"] > 0


@pytest.mark.timeout(240)
def test_the_optimizer_chooses_the_shape_and_reshapes_it_as_workers_leave_and_join(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """parallel="auto" with a per-worker memory budget the model does not fit: the planning core
    picks one replica over all 4 workers; a notice for a shard worker switches it to the shape the
    optimizer picks for 3 (P and M both change), KV carried, nothing recomputed; a 5th worker
    joining grows it back. The shapes are the optimizer's own answers for those worker counts."""
    from elastic_llm.control.shapes import CPU_WORKER, ShapePlanner
    from elastic_llm.cluster.enactor import model_spec_of
    from elastic_llm.planning.profiles import AnalyticProfile, Link

    fast = Link(bandwidth=1e12, latency=1e-9)  # links as fast as NVLink: tensor parallelism pays
    profile = AnalyticProfile("fast links", CPU_WORKER, 1, fast, fast, 4)
    budget = 500_000  # bytes: under the tiny model's weights + KV, so it must be sharded
    planner = ShapePlanner(model_spec_of(str(uneven_checkpoint)), profile, batch_size=4)
    on_four, on_three = planner.choose(4, budget).shape, planner.choose(3, budget).shape
    assert on_four != on_three and on_four[0] * on_four[1] == 4 and on_three[0] * on_three[1] == 3

    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7], [9, 9, 100, 2, 31, 4]]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, params)]
    with local_cluster(4, processes=True) as (cluster, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel="auto",
                                 memory_budget_bytes=budget, min_step_seconds=0.05, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False,
                           profile=profile) as llm:
            replica = _the_ready_replica(llm, timeout=120)
            assert tuple(replica["parallel"]) == on_four and len(replica["shards"]) == 4
            leader = replica["worker"]
            leaving = sorted(w for w in replica["shards"] if w != leader)[0]
            futures = llm.map(prompts, max_new_tokens=60, ignore_eos=True)
            wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
            assert llm.preempt(leaving, grace_s=30.0) == "accepted"
            wait_for(lambda: llm.status()["reshards"], timeout=60)
            cluster.scale(5)
            wait_for(lambda: len(llm.status()["reshards"]) >= 2, timeout=90)
            results = [f.result(timeout=120) for f in futures]
            status = llm.status()
    assert [r.token_ids for r in results] == want
    first, second = status["reshards"][:2]
    assert tuple(first["old"]) == on_four and tuple(first["new"]) == on_three
    assert leaving not in first["shards"] and leader in first["shards"]
    assert tuple(second["new"]) == on_four and leaving not in second["shards"]
    assert first["checkpoint_bytes"] == 0  # slices came from the live shards, not the checkpoint
    # the live reshard kept every worker under its memory budget (measured, per worker)
    assert first["peak_bytes"] and max(first["peak_bytes"].values()) <= budget, first["peak_bytes"]
    assert first["progressive"] and first["stage_ready"]
    assert status["tokens_recomputed"] == 0 and status["restarts"] == 0
    (notice,) = status["notices"]
    assert notice["worker"] == leaving and notice["migrated"] > 0 and notice["recomputed"] == 0


@pytest.mark.timeout(240)
def test_a_sustained_load_change_replans_the_fleet(uneven_checkpoint: Path, model: LoadedModel) -> None:
    """With a profile slow enough that throughput matters, the optimizer picks one (1, 4) replica
    for an idle fleet of 4 workers and four (1, 1) replicas at 0.5 requests/s or more. A burst of
    20 requests (0.67/s over a 30 s rate window) makes the controller plan again: the (1, 4) replica
    shrinks to (1, 1) with its KV, three more are placed, and every answer is the single engine's."""
    import dataclasses

    from elastic_llm.cluster.enactor import model_spec_of
    from elastic_llm.control.shapes import CPU_WORKER, ShapePlanner
    from elastic_llm.planning.profiles import AnalyticProfile, Link

    slow = 1e4
    device = dataclasses.replace(CPU_WORKER, fp32_flops=CPU_WORKER.fp32_flops / slow,
                                 fp16_flops=CPU_WORKER.fp16_flops / slow,
                                 memory_bandwidth=CPU_WORKER.memory_bandwidth / slow)
    fast = Link(bandwidth=1e12, latency=1e-9)
    profile = AnalyticProfile("slow device", device, 1, fast, fast, 4)
    budget = 2_000_000
    planner = ShapePlanner(model_spec_of(str(uneven_checkpoint)), profile, batch_size=4)
    idle, busy = planner.choose(4, budget, 0.0), planner.choose(4, budget, 20 / 30)
    assert (idle.D, idle.P, idle.M) == (1, 1, 4) and (busy.D, busy.P, busy.M) == (4, 1, 1)

    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7], [9, 9, 100, 2, 31, 4]] * 5
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, SamplingParams(max_new_tokens=12,
                                                                                    ignore_eos=True))]
    with local_cluster(4, processes=True) as (_, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel="auto",
                                 memory_budget_bytes=budget, min_step_seconds=0.05, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False,
                           profile=profile, load_check_s=0.5, rate_window_s=30.0) as llm:
            assert tuple(_the_ready_replica(llm, timeout=120)["parallel"]) == (1, 4)
            futures = llm.map(prompts, max_new_tokens=12, ignore_eos=True)
            wait_for(lambda: sum(r["state"] == "ready" for r in llm.status()["replicas"]) == 4, timeout=120)
            results = [f.result(timeout=120) for f in futures]
            status = llm.status()
            page = _dashboard(client.scheduler.address)
    assert [r.token_ids for r in results] == want
    assert "plans made again because the arrival rate moved (requests/s)" in page
    (replan,) = status["load_replans"]
    assert replan["planned_rate"] == 0.0 and replan["rate"] >= 0.5
    (shrink,) = status["reshards"]
    assert tuple(shrink["old"]) == (1, 4) and tuple(shrink["new"]) == (1, 1)
    assert all(tuple(r["parallel"]) == (1, 1) for r in status["replicas"])
    assert status["tokens_recomputed"] == 0 and status["restarts"] == 0


@pytest.mark.timeout(180)
def test_a_noticed_leader_hands_every_request_with_its_kv_to_a_successor_replica(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """One (2, 1) replica on 2 of 3 workers: a notice for its LEADER (whose engine drives the
    shards) moves the replica to the other shard worker plus the free one; every request's KV goes
    along (worker to worker), nothing is recomputed, and the tokens equal the single engine's."""
    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7]]
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)  # >= 10 s: outlasts the grace
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, params)]
    with local_cluster(3, processes=True) as (_, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel=(2, 1),
                                 min_step_seconds=0.05, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False) as llm:
            replica = _the_ready_replica(llm, timeout=90)
            leader = replica["worker"]
            results, status = _preempt_mid_generation(llm, prompts, 200, leader, grace_s=6.0)
    assert [r.token_ids for r in results] == want
    (after,) = [r for r in status["replicas"] if r["state"] == "ready"]
    assert after["replica"] != replica["replica"] and leader not in after["shards"]
    assert list(after["parallel"]) == [2, 1]
    assert status["tokens_recomputed"] == 0 and status["restarts"] == 0
    (notice,) = status["notices"]
    assert notice["worker"] == leader and notice["migrated"] == len(prompts) and notice["recomputed"] == 0
    (move,) = status["reshards"]
    assert move["leader_moved"] and move["kv_bytes"] > 0


@pytest.mark.timeout(180)
def test_reroute_dissolves_a_sharded_replica_that_loses_a_worker_and_its_requests_restart(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """The reroute baseline keeps (P, M): a notice for a shard worker of the only (2, 1) replica
    dissolves it; its requests restart from scratch once the leader and a free worker form a new
    (2, 1) replica, and still produce the single engine's tokens."""
    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300]]
    params = SamplingParams(max_new_tokens=120, ignore_eos=True)
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, params)]
    with local_cluster(3, processes=True) as (_, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel=(2, 1),
                                 min_step_seconds=0.05, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), policy="reroute", replica=options,
                           chat=False) as llm:
            replica = _the_ready_replica(llm, timeout=90)
            (other,) = [w for w in replica["shards"] if w != replica["worker"]]
            results, status = _preempt_mid_generation(llm, prompts, 120, other, grace_s=3.0)
    assert [r.token_ids for r in results] == want
    assert status["requests_restarted"] == len(prompts) and status["kv_bytes_migrated"] == 0
    assert not status["reshards"]  # the shape never changed: the replica was replaced
    (after,) = [r for r in status["replicas"] if r["state"] == "ready"]
    assert after["replica"] != replica["replica"] and other not in after["shards"]
    assert list(after["parallel"]) == [2, 1]


@pytest.mark.timeout(120)
def test_a_second_sharded_replica_takes_its_weights_from_the_ready_one_under_spotserve(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """One (2, 1) replica is ready on 2 workers; 2 more join: the second (2, 1) replica's shards
    pull every slice from the first's shards (worker to worker, none from the checkpoint), and
    both serve the single engine's tokens."""
    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7], [9, 9, 100, 2, 31, 4]]
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]
    with local_cluster(2, processes=True) as (cluster, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel=(2, 1),
                                 min_step_seconds=0.02, shard_timeout_s=30.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False) as llm:
            first = _the_ready_replica(llm, timeout=60)
            cluster.scale(4)
            ready = wait_for(lambda: [r for r in llm.status()["replicas"] if r["state"] == "ready"][1:],
                             timeout=60)
            results = [f.result(timeout=60) for f in llm.map(prompts, max_new_tokens=NEW_TOKENS,
                                                             ignore_eos=True)]
            status = llm.status()
    (second,) = ready
    assert first["weights"] == "checkpoint" and second["weights"] == "peer"
    assert not set(second["shards"]) & set(first["shards"])
    assert status["weight_bytes_from_peers"] >= model.spec.total_bytes  # every slice (stage 1 adds the tied head)
    assert [r.token_ids for r in results] == want
    assert all(r["step_seconds"] > 0 for r in status["replicas"])  # both replicas served


def _pid(dask_worker) -> int:  # type: ignore[no-untyped-def]
    import os

    return os.getpid()


@pytest.mark.timeout(240)
def test_a_sigkilled_sharded_leader_fences_its_shard_and_every_request_still_finishes(
        uneven_checkpoint: Path, model: LoadedModel) -> None:
    """3 workers, one (2, 1) replica, its LEADER killed with SIGKILL mid-generation: the surviving
    shard worker is fenced (restarted), a new (2, 1) replica forms on healthy workers, and every
    request finishes with the single engine's tokens (they resume from their committed tokens)."""
    import os
    import signal

    prompts = [[17, 3, 250, 41, 9], [88, 1, 5, 300], [45, 6, 7], [9, 9, 100, 2, 31, 4]]
    params = SamplingParams(max_new_tokens=80, ignore_eos=True)
    want = [c.token_ids for c in LLMEngine(model).generate(prompts, params)]
    with local_cluster(3, processes=True) as (_, client):
        options = ReplicaOptions(model=str(uneven_checkpoint), max_batch_size=4, parallel=(2, 1),
                                 min_step_seconds=0.05, shard_timeout_s=15.0)
        with ServingClient(client, model=str(uneven_checkpoint), replica=options, chat=False) as llm:
            replica = _the_ready_replica(llm, timeout=90)
            futures = llm.map(prompts, max_new_tokens=80, ignore_eos=True)
            wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
            pid = client.run(_pid, workers=[replica["worker"]])[replica["worker"]]
            os.kill(pid, signal.SIGKILL)
            results = [f.result(timeout=180) for f in futures]
            status = llm.status()
    assert [r.token_ids for r in results] == want
    assert status["restarts"] >= len(prompts) and status["finished"] == len(prompts)
    (after,) = [r for r in status["replicas"] if r["state"] == "ready"]
    assert after["replica"] != replica["replica"] and replica["worker"] not in after["shards"]
