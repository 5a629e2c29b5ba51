"""NoticeBoard on a real scheduler: the API helper, deduplication, listeners, workers leaving."""

from __future__ import annotations

import time

import pytest

from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.notices import MAX_NOTICE_S, NOTICE_TOPIC, NoticeBoard, send_preemption_notice

from .helpers import local_cluster, wait_for


@pytest.mark.timeout(60)
def test_api_notices_listeners_and_departures() -> None:
    with local_cluster(2) as (cluster, client):
        client.register_plugin(NoticeBoard())
        client.register_plugin(NoticeBoard())  # idempotent: the first board stays
        board = NoticeBoard.of(cluster.scheduler)
        heard: list[PreemptionNotice] = []

        def broken(notice: PreemptionNotice) -> None:
            raise RuntimeError("listener bug")

        board.subscribe(broken)  # must not stop the others or the scheduler
        unsubscribe = board.subscribe(heard.append)
        first, second = sorted(cluster.scheduler.workers)
        name = cluster.scheduler.workers[first].name

        before = time.time()
        assert send_preemption_notice(client, first, grace_s=30.0) == "accepted"
        [notice] = heard
        assert notice.worker == first and notice.source == "api"
        assert notice.instance_id == str(name)  # filled in from the worker's metadata
        assert before + 30.0 <= notice.deadline <= time.time() + 30.0

        # A later deadline is a duplicate; an earlier one replaces it and is heard again.
        assert send_preemption_notice(client, first, deadline=notice.deadline + 5) == "duplicate"
        assert send_preemption_notice(client, name, deadline=notice.deadline - 5,  # by worker name
                                      source="operator") == "accepted"
        assert [n.deadline for n in heard] == [notice.deadline, notice.deadline - 5]
        assert board.pending()[first].source == "operator"

        assert send_preemption_notice(client, "tcp://10.9.9.9:1", grace_s=1.0) == "unknown-worker"
        assert send_preemption_notice(client, second, deadline=float("nan")) == "invalid"
        with pytest.raises(ClusterConfigError):
            send_preemption_notice(client, second)

        # Without the operator token, or far in the future: refused, or clamped.
        assert client.sync(client.scheduler.elastic_llm_preemption_notice, worker=second,
                           deadline=time.time() + 5) == "unauthorized"
        assert client.sync(client.scheduler.elastic_llm_preemption_notice, worker=second,
                           deadline=time.time() + 5, token="guess") == "unauthorized"
        assert len(heard) == 2

        # Every accepted notice is a Dask event clients can read.
        events = wait_for(lambda: (lambda got: len(got) == 2 and got)(client.get_events(NOTICE_TOPIC)))
        assert [PreemptionNotice.from_dict(msg) for _, msg in events] == heard

        unsubscribe()
        assert send_preemption_notice(client, second, grace_s=1e6) == "accepted"
        assert len(heard) == 2 and set(board.pending()) == {first, second}
        assert board.pending()[second].deadline <= time.time() + MAX_NOTICE_S  # clamped

        # A worker that leaves takes its pending notice with it; the history stays.
        client.retire_workers([first])
        wait_for(lambda: first not in board.pending())
        assert set(board.pending()) == {second}
        assert len(board.history()) == 3


def test_board_lookup_without_registration_fails() -> None:
    from types import SimpleNamespace

    with pytest.raises(LookupError):
        NoticeBoard.of(SimpleNamespace(plugins={}))  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_a_worker_may_announce_only_its_own_preemption() -> None:
    from elastic_llm.cluster.notices import WORKER_NOTICE_OP

    with local_cluster(2) as (cluster, client):
        client.register_plugin(NoticeBoard())
        board = NoticeBoard.of(cluster.scheduler)
        first, second = sorted(cluster.scheduler.workers)

        def announce(about: str, dask_worker) -> None:  # type: ignore[no-untyped-def]
            dask_worker.batched_stream.send({"op": WORKER_NOTICE_OP, "notice": {
                "worker": about, "deadline": time.time() + 20, "source": "test"}})

        client.run(announce, second, workers=[first])  # about another worker: refused
        client.run(announce, first, workers=[first])  # about itself: accepted
        wait_for(lambda: first in board.pending())
        time.sleep(0.3)
        assert set(board.pending()) == {first}
