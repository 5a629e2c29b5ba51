"""Request-losing faults reproduced with real worker processes: a source killed while a target
pulls its requests (and the double requeue that followed), and a client whose connection drops."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.request import FinishReason

from .helpers import local_cluster, results_or_report, wait_for
from .test_serving import NEW_TOKENS, _prompts, _reference


def _hang_exports(marker: str) -> None:
    """(Run on a worker) its replica's `export_requests` writes `marker`, then never answers:
    a pull from it is under way when the process is SIGKILLed."""
    from elastic_llm.cluster import replica_actor

    def hang(self: object, *args: object, **kwargs: object) -> None:
        Path(marker).write_text(str(time.time()))
        time.sleep(600)

    replica_actor.ReplicaActor.export_requests = hang  # type: ignore[method-assign, assignment]


@pytest.mark.timeout(180)
def test_a_source_killed_mid_pull_loses_and_duplicates_nothing(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    marker = tmp_path / "pull-started"
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=6.0, memory_bytes=2**30)
        for name in "ab":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        # paced so the requests are mid-way when the pull starts (about 4 s into the 6 s grace)
        options = ReplicaOptions(model=str(checkpoint), max_batch_size=4, min_step_seconds=0.08)
        with ServingClient(client, model=str(checkpoint), replica=options, chat=False,
                           migration_margin_s=1.5) as llm:
            llm.wait_for_replicas(2, timeout=120)
            [address_a] = [a for a, ws in cluster.scheduler.workers.items() if ws.name == "a"]
            client.run(_hang_exports, str(marker), workers=[address_a])
            prompts = _prompts(8)
            futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            wait_for(lambda: all(r["requests"] > 0 for r in llm.status()["replicas"]), timeout=30)
            # a notice, then SIGKILL at its deadline: b's pull from a hangs until a is gone
            preempting = threading.Thread(target=emulator.preempt, args=("a",), kwargs={"notice": True})
            preempting.start()
            results = results_or_report(llm, futures, 120, lambda: emulator.records)
            done_at = time.time()
            preempting.join(timeout=60)

            killed = [r for r in emulator.records if r.kind == "killed" and r.instance_id == "a"]
            assert marker.exists() and killed and float(marker.read_text()) < killed[0].wall_time
            # the pull gave up when its source went (not 30 s later); b finished the rest at once
            assert done_at - killed[0].wall_time < 20.0, done_at - killed[0].wall_time
            # each request finished once, with the churn-free text (none failed "already in use")
            assert [r.token_ids for r in results] == _reference(checkpoint, prompts)
            assert {r.finish_reason for r in results} == {FinishReason.LENGTH}
            status = llm.status()
            assert status["finished"] == 8 and status["queued"] == 0 and status["running"] == 0
            assert status["tokens_recomputed"] > 0  # the pulled KV never arrived: recomputed on b
            # the target's actor thread is not held: it serves new work at once
            again = llm.map(prompts[:2], max_new_tokens=8, ignore_eos=True)
            assert [r.token_ids for r in (f.result(timeout=30) for f in again)] == \
                _reference(checkpoint, prompts[:2], 8)


@pytest.mark.timeout(120)
def test_a_client_whose_connection_drops_and_comes_back_loses_nothing(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    options = ReplicaOptions(model=str(checkpoint), max_batch_size=4, min_step_seconds=0.03)
    with local_cluster(1, processes=True) as (cluster, client), \
            ServingClient(client, model=str(checkpoint), replica=options, chat=False) as llm:
        llm.wait_for_replicas(1, timeout=120)
        prompts = _prompts(4)
        futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        wait_for(lambda: llm.status()["running"] == 4, timeout=30)
        scheduler = cluster.scheduler
        assert client.id in scheduler.clients
        # drop the client's connection to the scheduler: Dask removes the client, then it reconnects
        client.loop.add_callback(client.scheduler_comm.comm.abort)
        wait_for(lambda: llm.status()["client_disconnects"] >= 1, timeout=15)
        wait_for(lambda: client.status == "running" and client.id in scheduler.clients, timeout=30)
        wait_for(lambda: llm.status()["clients_reconnecting"] == 0, timeout=15)  # its polls go on
        results = results_or_report(llm, futures, 60)
        assert {r.finish_reason for r in results} == {FinishReason.LENGTH}  # none aborted
        assert [r.token_ids for r in results] == _reference(checkpoint, prompts)
