"""Elastic serving end to end on a real LocalCluster with worker processes and a tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_llm import InvalidRequestError, LLMEngine, SamplingParams
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.loader import load_model

from .helpers import local_cluster, wait_for

NEW_TOKENS = 110


def _prompts(n: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(1, 320, (int(k),), generator=generator).tolist()
            for k in torch.randint(3, 20, (n,), generator=generator)]


def _reference(checkpoint: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[tuple[int, ...]]:
    engine = LLMEngine(load_model(checkpoint))
    done = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [c.token_ids for c in done]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("llama-gqa-untied")


@pytest.fixture()
def fleet(checkpoint: Path) -> Iterator[tuple[SpotEmulator, ServingClient]]:
    """Three spot workers (a, b, c) with ready replicas, paced to 25 ms per iteration."""
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=2.0, memory_bytes=2**30)
        for name in "abc":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        options = ReplicaOptions(model=str(checkpoint), max_batch_size=4, min_step_seconds=0.025)
        llm = ServingClient(client, model=str(checkpoint), replica=options, chat=False, migration_margin_s=1.5)
        llm.wait_for_replicas(3, timeout=120)
        yield emulator, llm
        llm.close()


@pytest.mark.timeout(240)
def test_churn_loses_nothing_and_matches_a_churn_free_run(
        fleet: tuple[SpotEmulator, ServingClient], checkpoint: Path) -> None:
    emulator, llm = fleet
    prompts = _prompts(20)
    futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def churn() -> None:
        emulator.preempt("a", notice=True)   # notice, 2 s grace, then SIGKILL
        emulator.acquire("d", market="spot", price_per_hour=1.9)
        emulator.preempt("c", notice=False)  # SIGKILL without notice
        emulator.preempt("b", notice=True)

    churner = threading.Thread(target=churn)
    churner.start()
    results = [f.result(timeout=200) for f in futures]
    churner.join(timeout=120)

    assert [r.token_ids for r in results] == _reference(checkpoint, prompts)
    status = llm.status()
    assert status["finished"] == 20 and status["queued"] == 0 and status["running"] == 0
    migrated = [n["migrated"] for n in status["notices"]]
    assert len(migrated) == 2 and sum(migrated) > 0, status["notices"]
    assert status["tokens_recomputed"] > 0  # the worker killed without notice lost its KV
    assert status["cost"]["spot_usd"] > 0


@pytest.mark.timeout(180)
def test_noticed_preemption_migrates_kv_and_recomputes_nothing(
        fleet: tuple[SpotEmulator, ServingClient], checkpoint: Path) -> None:
    emulator, llm = fleet
    # a worker joining a running fleet gets its replica's weights from a ready peer, not the checkpoint
    emulator.acquire("d", market="spot", price_per_hour=1.9)
    llm.wait_for_replicas(4, timeout=120)
    scheduler = llm._dask.cluster.scheduler  # noqa: SLF001 - the fixture's LocalCluster
    [address_d] = [a for a, ws in scheduler.workers.items() if ws.name == "d"]
    status = llm.status()
    assert {r["worker"]: r["weights"] for r in status["replicas"]}[address_d] == "peer"
    assert all(r["start_seconds"] > 0 for r in status["replicas"])
    assert status["weight_bytes_from_peers"] > 0
    prompts = _prompts(16)
    futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    wait_for(lambda: all(r["requests"] > 0 for r in llm.status()["replicas"]), timeout=30)
    emulator.preempt("a", notice=True)
    results = [f.result(timeout=150) for f in futures]
    assert [r.token_ids for r in results] == _reference(checkpoint, prompts)  # the peer-built one too
    status = llm.status()
    assert status["tokens_recomputed"] == 0
    assert status["notices"][0]["migrated"] > 0


@pytest.mark.timeout(180)
def test_stream_cancel_and_bad_input(fleet: tuple[SpotEmulator, ServingClient], checkpoint: Path) -> None:
    _, llm = fleet
    prompt = _prompts(1)[0]
    with pytest.raises(InvalidRequestError):
        llm.submit(prompt, max_new_tokens=0)
    with pytest.raises(InvalidRequestError):
        llm.submit([10**6])
    with pytest.raises(InvalidRequestError):
        llm.submit("text needs a tokenizer")
    long = llm.submit(prompt, max_new_tokens=200, ignore_eos=True)
    wait_for(lambda: llm.status()["running"] > 0, timeout=30)
    assert long.cancel()
    cancelled = long.result(timeout=30)
    assert cancelled.finish_reason.value == "abort" and len(cancelled.token_ids) < 200
    short = llm.submit(prompt, max_new_tokens=12, ignore_eos=True)
    assert short.result(timeout=60).token_ids == _reference(checkpoint, [prompt])[0][:12]
    _check_monitoring(llm)


@pytest.mark.timeout(180)
def test_a_follow_up_turn_goes_to_the_replica_holding_the_conversation(
        fleet: tuple[SpotEmulator, ServingClient], checkpoint: Path) -> None:
    _, llm = fleet
    generator = torch.Generator().manual_seed(11)
    first = torch.randint(1, 320, (150,), generator=generator).tolist()
    answer = llm.submit(first, max_new_tokens=20, ignore_eos=True).result(timeout=60).token_ids
    follow_up = [*first, *answer, 7, 8, 9]
    # the replica that served the first turn is made busier than the others (105 queued tokens),
    # yet still gets the follow-up: its cache saves 168 tokens of prefill
    blocker = llm.submit([5, 6, 7, 8, 9], max_new_tokens=100, ignore_eos=True)
    second = llm.submit(follow_up, max_new_tokens=20, ignore_eos=True).result(timeout=60)
    blocker.result(timeout=60)
    assert second.token_ids == _reference(checkpoint, [follow_up], 20)[0]
    assert llm.status()["prefix_tokens_reused"] >= 168


def _check_monitoring(llm: ServingClient) -> None:
    """The prometheus collector (scheduler process = this process) and the Streamlit page."""
    from prometheus_client import generate_latest
    from streamlit.testing.v1 import AppTest

    metrics = generate_latest().decode()
    finished = [line for line in metrics.splitlines() if line.startswith("elastic_llm_requests_finished_total")]
    assert finished and float(finished[0].split()[-1]) == llm.status()["finished"] >= 2
    assert any(line.startswith("elastic_llm_prefix_tokens_reused_total") for line in metrics.splitlines())
    address = llm._dask.scheduler.address  # noqa: SLF001
    app = AppTest.from_file(str(Path(__file__).parents[2] / "dashboards" / "app.py"),
                            default_timeout=60)
    app.run()
    app.sidebar.text_input[0].set_value(address)
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    labels = {m.label: m.value for m in app.metric}
    assert labels["finished"] == str(llm.status()["finished"])
    reused = f"prefix tokens reused {llm.status()['prefix_tokens_reused']} "
    assert any(reused in caption.value for caption in app.caption), [c.value for c in app.caption]


def _ask_from_a_task(checkpoint: str, prompt: list[int]) -> tuple[int, ...]:
    """Runs inside a Dask task: the service is usable from workflows' own tasks."""
    from distributed import get_client

    with ServingClient(get_client(), model=checkpoint, chat=False) as llm:
        return llm.submit(prompt, max_new_tokens=10, ignore_eos=True).result(timeout=60).token_ids


async def _watch_metadata(url: str, dask_worker: Any) -> None:
    """Install the AWS metadata watcher on this one worker."""
    from elastic_llm.cluster.metadata import MetadataWatcher

    await dask_worker.plugin_add(MetadataWatcher("aws", base_url=url, poll_interval_s=0.05))


@pytest.mark.timeout(180)
def test_usable_from_inside_dask_tasks_and_watcher_notice_migrates(
        fleet: tuple[SpotEmulator, ServingClient], checkpoint: Path) -> None:
    from .helpers import FakeMetadataServer

    emulator, llm = fleet
    client = llm._dask  # noqa: SLF001 - the fixture's Dask client
    prompts = _prompts(3)
    from_tasks = client.gather(client.map(_ask_from_a_task, [str(checkpoint)] * 3, prompts, pure=False))
    assert list(from_tasks) == [ids[:10] for ids in _reference(checkpoint, prompts)]

    [address_a] = [a for a, ws in client.cluster.scheduler.workers.items() if ws.name == "a"]
    with FakeMetadataServer("aws") as server:
        client.run(_watch_metadata, server.url, workers=[address_a])
        prompts = _prompts(9)
        long = 220  # about 5.5 s of decoding at 25 ms per iteration: past the deadline
        futures = llm.map(prompts, max_new_tokens=long, ignore_eos=True)
        wait_for(lambda: all(r["requests"] > 0 for r in llm.status()["replicas"]), timeout=30)
        server.announce(time.time() + 4.0)  # the AWS format has whole seconds: 3-4 s of grace
        results = [f.result(timeout=150) for f in futures]
    assert [r.token_ids for r in results] == _reference(checkpoint, prompts, long)
    status = llm.status()
    [notice] = status["notices"]
    assert notice["worker"] == address_a and notice["migrated"] > 0
    assert status["tokens_recomputed"] == 0
    assert {r["worker"] for r in status["replicas"] if r["state"] == "draining"} == {address_a}
