"""SpotEmulator on a LocalCluster with worker processes: notices, real deaths, acquisitions."""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from distributed.core import Status

from elastic_llm.cluster.contracts import InstanceInfo, PreemptionNotice
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.errors import ClusterConfigError, EmulatorError
from elastic_llm.cluster.instance import get_fleet_info
from elastic_llm.cluster.notices import NoticeBoard
from elastic_llm.cluster.traces import SpotEvent, SpotTrace

from .helpers import local_cluster, wait_for


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(90)
def test_replay_notices_kills_and_acquires() -> None:
    trace = SpotTrace("mini", 6.0, (
        SpotEvent(0, "acquire", "a", "spot", 1.0), SpotEvent(0, "acquire", "b", "spot", 1.0),
        SpotEvent(2, "preempt", "a"), SpotEvent(2, "kill", "b"),
        SpotEvent(3, "acquire", "c", "on-demand", 3.0)))
    with local_cluster(0, processes=True) as (cluster, client):
        client.register_plugin(NoticeBoard())
        scheduler = cluster.scheduler
        heard: list[tuple[PreemptionNotice, bool]] = []
        NoticeBoard.of(scheduler).subscribe(lambda n: heard.append((n, n.worker in scheduler.workers)))
        # time_scale 2: offsets and the 2 s grace pass twice as fast (grace 1 s of wall time).
        emulator = SpotEmulator(cluster, trace, time_scale=2.0, grace_s=2.0, memory_bytes=2**30)
        emulator.start()
        wait_for(lambda: {"a", "b"} <= set(cluster.workers), timeout=60)
        nannies = dict(cluster.workers)
        emulator.wait(timeout=60)

        kinds = [(r.kind, r.instance_id) for r in emulator.records]
        assert kinds[:4] == [("acquiring", "a"), ("acquiring", "b"), ("acquired", "a"), ("acquired", "b")]
        assert kinds[-1] == ("end", "")
        by = {(r.kind, r.instance_id): r for r in emulator.records}
        assert ("notice", "b") not in by  # killed without notice

        # The notice reached the board while the worker was still there, with deadline = now + grace.
        [(notice, present)] = heard
        assert present and notice.worker == by["acquired", "a"].address
        assert (notice.instance_id, notice.source) == ("a", "emulator")
        notice_record, killed_a = by["notice", "a"], by["killed", "a"]
        assert notice.deadline - 1.0 <= notice_record.wall_time <= notice.deadline  # sent, then recorded
        assert killed_a.wall_time >= notice.deadline
        assert by["killed", "b"].wall_time < notice.deadline

        # The processes really died, nothing restarted them, and the scheduler lost them.
        for name in ("a", "b"):
            assert by["killed", name].pid == by["acquired", name].pid > 0
            wait_for(lambda name=name: _dead(by["killed", name].pid), timeout=10)
            assert nannies[name].status == Status.closed
        wait_for(lambda: {ws.name for ws in scheduler.workers.values()} == {"c"}, timeout=30)
        assert set(cluster.workers) == set(cluster.worker_spec) == {"c"} == emulator.live

        # The acquired instance carries its metadata to the scheduler.
        [info] = get_fleet_info(client).values()
        assert info == InstanceInfo("c", "on-demand", 3.0, 2**30, grace_s=1.0)


@pytest.mark.timeout(90)
def test_stop_and_on_demand_preemption() -> None:
    trace = SpotTrace("slow", 600.0, (SpotEvent(0, "acquire", "a", "spot", 1.0),
                                      SpotEvent(500, "preempt", "a")))
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, trace, grace_s=0.0)
        emulator.start()
        wait_for(lambda: "a" in emulator.live, timeout=60)
        emulator.stop()
        with pytest.raises(concurrent.futures.CancelledError):
            emulator.wait(timeout=5)
        assert [r.kind for r in emulator.records] == ["acquiring", "acquired"]
        assert "a" in cluster.workers  # stopping keeps the fleet

        address = emulator.acquire("b", market="on-demand", price_per_hour=2.0)
        assert address in cluster.scheduler.workers
        emulator.preempt("a", notice=False)  # no NoticeBoard registered: SIGKILL at once
        assert set(cluster.workers) == {"b"}
        with pytest.raises(EmulatorError):
            emulator.preempt("a")
        with pytest.raises(EmulatorError):
            emulator.acquire("b")


def test_emulator_needs_worker_processes() -> None:
    with local_cluster(0, processes=False) as (cluster, _client):
        with pytest.raises(ClusterConfigError, match="processes=True"):
            SpotEmulator(cluster, SpotTrace("empty", 1.0, ()))
