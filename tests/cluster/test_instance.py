"""Instance metadata: the contract, how a worker carries it, and what the scheduler reads."""

from __future__ import annotations

import asyncio

import pytest
from distributed import Scheduler, Worker
from distributed.diagnostics.plugin import SchedulerPlugin

from elastic_llm.cluster.contracts import UNBOUNDED_MEMORY, InstanceInfo, PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.instance import (
    EXTRA_KEY,
    InstanceMetadata,
    dask_setup,
    fleet_info,
    get_fleet_info,
    info_from_env,
    instance_info,
    instance_metadata_options,
    local_instance_info,
)

from .helpers import local_cluster

SPOT = InstanceInfo("i-spot-1", "spot", 1.9046, 8 << 30, 120.0)


def test_contracts_validate_and_round_trip() -> None:
    assert InstanceInfo.from_dict(SPOT.to_dict()) == SPOT and SPOT.preemptible
    assert InstanceInfo.from_dict({**SPOT.to_dict(), "future_field": 1}) == SPOT
    for bad in (dict(instance_id=""), dict(market="reserved"), dict(price_per_hour=-1.0),
                dict(memory_bytes=-5), dict(grace_s=float("inf"))):
        with pytest.raises(ClusterConfigError):
            InstanceInfo(**{"instance_id": "x", **bad})  # type: ignore[arg-type]
    notice = PreemptionNotice("tcp://1.2.3.4:5", "i-1", 100.0, "aws")
    assert PreemptionNotice.from_dict(notice.to_dict()) == notice
    assert notice.remaining(now=70.0) == 30.0
    worker = SPOT.to_planning_worker("tcp://1.2.3.4:5")
    assert (worker.name, worker.instance_id, worker.memory_bytes) == ("tcp://1.2.3.4:5", "i-spot-1", 8 << 30)


def test_info_from_env() -> None:
    env = {"ELASTIC_LLM_MARKET": "spot", "ELASTIC_LLM_PRICE_PER_HOUR": "1.9046",
           "ELASTIC_LLM_MEMORY_BYTES": str(8 << 30), "ELASTIC_LLM_GRACE_S": "120"}
    assert info_from_env("i-spot-1", env) == SPOT
    assert info_from_env("w", {}) == InstanceInfo("w")
    with pytest.raises(ClusterConfigError):
        info_from_env("w", {"ELASTIC_LLM_PRICE_PER_HOUR": "cheap"})


def test_options_keep_existing_plugins() -> None:
    marker = object()
    options = instance_metadata_options(SPOT, {"nthreads": 1, "plugins": (marker,)})
    assert options["name"] == "i-spot-1" and options["nthreads"] == 1
    assert options["plugins"][0] is marker and options["plugins"][1].info == SPOT


class _SeenAtRegistration(SchedulerPlugin):
    """Records what the scheduler knows about a worker the moment it is added."""

    name = "seen-at-registration"

    def __init__(self) -> None:
        self.seen: dict[str, InstanceInfo] = {}

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.seen[worker] = instance_info(scheduler.workers[worker])


@pytest.mark.timeout(60)
def test_scheduler_sees_metadata_from_registration_on() -> None:
    async def main() -> None:
        async with Scheduler(dashboard_address=":0", port=0) as scheduler:
            seen = _SeenAtRegistration()
            scheduler.add_plugin(seen)
            async with Worker(scheduler.address, nthreads=1, plugins=(InstanceMetadata(SPOT),),
                              name=SPOT.instance_id) as tagged, \
                    Worker(scheduler.address, nthreads=1, memory_limit=2**30, name="plain") as plain:
                assert seen.seen[tagged.address] == SPOT
                assert seen.seen[plain.address] == InstanceInfo("plain", "unknown", memory_bytes=2**30)
                assert fleet_info(scheduler) == seen.seen
                assert local_instance_info(tagged) == SPOT
                assert local_instance_info(plain) == InstanceInfo("plain", "unknown", memory_bytes=2**30)
                assert EXTRA_KEY not in scheduler.workers[plain.address].extra

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_preload_hook_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTIC_LLM_MARKET", "spot")
    monkeypatch.setenv("ELASTIC_LLM_PRICE_PER_HOUR", "0.5")

    async def main() -> InstanceInfo:
        async with Scheduler(dashboard_address=":0", port=0) as scheduler:
            async with Worker(scheduler.address, nthreads=1, name="cli-worker",
                              preload=["elastic_llm.cluster.instance"]) as worker:
                assert local_instance_info(worker).market == "spot"
                return instance_info(scheduler.workers[worker.address])

    assert asyncio.run(main()) == InstanceInfo("cli-worker", "spot", 0.5)


@pytest.mark.timeout(60)
def test_plain_local_cluster_workers_get_defaults() -> None:
    with local_cluster(1, memory_limit="1GiB") as (cluster, client):
        [(address, info)] = get_fleet_info(client).items()
        name = cluster.scheduler.workers[address].name
        assert info == InstanceInfo(str(name), "unknown", 0.0, 2**30)  # billed by the controller's default
    assert InstanceInfo("x").memory_bytes == UNBOUNDED_MEMORY
    assert dask_setup  # the preload entry point exists
