"""The capacity-aware ``beyond`` policy on a real LocalCluster with worker processes: when a
notice leaves too few workers for the required rate, the controller asks for an on-demand
instance on the Dask topic, `CapacityFulfiller` starts a real worker process for it, and a replica
serves there; when spot capacity returns, the on-demand instance is drained and given back first,
and its process dies. Every request gives the churn-free
tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from elastic_llm.cluster.capacity_fulfiller import CapacityFulfiller
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.control import BeyondSpotServe
from elastic_llm.control.capacity import CapacityPolicy
from elastic_llm.control.shape_choice import ShapeChoice

from .helpers import local_cluster, results_or_report, wait_for
from .test_serving import _prompts, _reference

NEW_TOKENS = 200  # 25 ms per iteration: 5 s, past the 3 s grace and the 1 s before acquiring
BUDGET = 2**30  # bytes per worker: the tiny model fits one worker, so replicas are (1, 1)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("llama-gqa-untied")


def _rate_needing_two_workers(checkpoint: Path) -> float:
    """An arrival rate the planning core meets on two workers and not on one."""
    from elastic_llm.cluster.enactor import model_spec_of

    shapes = ShapeChoice(None, 4, adaptive=True)
    shapes.spec = model_spec_of(str(checkpoint))
    optimizer = shapes._planner_for(BUDGET).optimizer(BUDGET)  # noqa: SLF001 - the fleet's own planner
    one = optimizer.choose(1, 0.0).estimate.throughput
    rate = 1.5 * one
    assert shapes.workers_needed(rate, BUDGET, 8) == (2, (1, 1))
    return rate


def _markets(status: dict[str, Any]) -> dict[str, str]:
    return {w["worker"]: w["market"] for w in status["workers"]}


@pytest.mark.timeout(240)
def test_beyond_acquires_on_demand_when_spot_falls_short_and_gives_it_back_first(checkpoint: Path) -> None:
    rate = _rate_needing_two_workers(checkpoint)
    policy = BeyondSpotServe(capacity=CapacityPolicy(acquire_after_s=1.0, release_after_s=2.0, drain_s=3.0,
                                                     check_s=0.5))
    prompts = _prompts(6)
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=3.0, memory_bytes=BUDGET)
        fulfiller = CapacityFulfiller(client, emulator, prefix="od")
        fulfiller.start()
        for name in "ab":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        options = ReplicaOptions(model=str(checkpoint), max_batch_size=4, min_step_seconds=0.025,
                                 parallel="auto", memory_budget_bytes=BUDGET)
        with ServingClient(client, model=str(checkpoint), policy=policy, replica=options, chat=False,
                           migration_margin_s=1.0, required_rate=rate) as llm:
            llm.wait_for_replicas(2, timeout=120)
            assert llm.status()["capacity"]["acquired"] == 0  # two spot workers meet the rate
            futures = llm.map(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            wait_for(lambda: llm.status()["tokens_committed"] >= 2 * len(prompts), timeout=60)
            emulator.preempt("a", notice=True)  # one usable worker left: short of the two needed

            def on_demand_serving() -> str | None:
                status = llm.status()
                markets = _markets(status)
                return next((r["worker"] for r in status["replicas"]
                             if r["state"] == "ready" and markets.get(r["worker"]) == "on-demand"), None)

            od_worker = wait_for(on_demand_serving, timeout=90)
            assert emulator.instance_at(od_worker) == "od-1"
            emulator.acquire("c", market="spot", price_per_hour=1.9)  # spot returns: a surplus
            wait_for(lambda: "od-1" not in emulator.live, timeout=90)
            results = results_or_report(llm, futures, timeout=120)
            wait_for(lambda: od_worker not in _markets(llm.status()), timeout=60)  # its loss is seen
            status = llm.status()
    assert [r.token_ids for r in results] == _reference(checkpoint, prompts, NEW_TOKENS)
    assert status["capacity"]["acquired"] == 1 and status["capacity"]["released"] == 1
    assert [(r.action, r.instance_id, r.market) for r in fulfiller.records] == [
        ("acquire", "od-1", "on-demand"), ("release", "od-1", "")]
    actions = [d["action"] for d in status["capacity"]["decisions"]]
    assert actions[:1] == ["acquire"] and actions.index("drain") < actions.index("release")
    assert status["failed"] == 0 and status["finished"] == len(prompts)
    kinds = [(r.kind, r.instance_id) for r in emulator.records]
    assert ("acquired", "od-1") in kinds and ("killed", "od-1") in kinds
