"""NoticeBoard on a real scheduler: the API helper, deduplication, listeners, workers leaving."""

from __future__ import annotations

import time

import pytest

from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.notices import NOTICE_TOPIC, NoticeBoard, send_preemption_notice

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

        # Every accepted notice is a Dask event clients can read.
        events = wait_for(lambda: (lambda got: len(got) == 2 and got)(client.get_events(NOTICE_TOPIC)))
        assert [PreemptionNotice.from_dict(msg) for _, msg in events] == heard

        unsubscribe()
        assert send_preemption_notice(client, second, grace_s=10.0) == "accepted"
        assert len(heard) == 2 and set(board.pending()) == {first, second}

        # A worker that leaves takes its pending notice with it; the history stays.
        client.retire_workers([first])
        wait_for(lambda: first not in board.pending())
        assert set(board.pending()) == {second}
        assert len(board.history()) == 3


def test_board_lookup_without_registration_fails() -> None:
    from types import SimpleNamespace

    with pytest.raises(LookupError):
        NoticeBoard.of(SimpleNamespace(plugins={}))  # type: ignore[arg-type]
