"""Each fleet policy on the same churn, on a real LocalCluster with worker processes: a notice for
one of two workers (then SIGKILL) and a third joining mid-run. SpotServe migrates the requests
with their KV, reroute restarts them elsewhere, reparallelize reloads every replica; all three
give the churn-free tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.control import UnknownPolicyError

from .helpers import local_cluster, wait_for
from .test_serving import _prompts, _reference

NEW_TOKENS = 150  # 3.75 s at 25 ms per iteration: past the 3 s grace period


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("llama-gqa-untied")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("policy", ["spotserve", "reroute", "reparallelize"])
def test_each_policy_on_the_same_churn(policy: str, checkpoint: Path) -> None:
    prompts = _prompts(6)
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=3.0, memory_bytes=2**30)
        for name in "ab":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        options = ReplicaOptions(model=str(checkpoint), max_batch_size=4, min_step_seconds=0.025)
        with ServingClient(client, model=str(checkpoint), policy=policy, replica=options, chat=False,
                           migration_margin_s=1.0) as llm:
            llm.wait_for_replicas(2, timeout=120)
            futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
            emulator.preempt("a", notice=True)
            emulator.acquire("c", market="spot", price_per_hour=1.9)
            results = [f.result(timeout=150) for f in futures]
            status = llm.status()
    assert [r.token_ids for r in results] == _reference(checkpoint, prompts, NEW_TOKENS)
    assert status["policy"] == policy and status["finished"] == len(prompts)
    (notice,) = status["notices"]
    if policy == "spotserve":
        assert notice["migrated"] > 0 and status["kv_bytes_migrated"] > 0
        assert status["requests_restarted"] == notice["recomputed"] and status["reloads"] == 0
    elif policy == "reroute":
        assert status["requests_restarted"] > 0 and status["kv_bytes_migrated"] == 0 and status["reloads"] == 0
    else:
        assert status["reloads"] >= 1 and status["requests_restarted"] > 0 and status["kv_bytes_migrated"] == 0


def test_an_unknown_policy_is_a_clear_error_before_anything_starts(checkpoint: Path) -> None:
    with local_cluster(0) as (_, client), pytest.raises(UnknownPolicyError, match="choose one of"):
        ServingClient(client, model=str(checkpoint), policy="spotserv", chat=False)
