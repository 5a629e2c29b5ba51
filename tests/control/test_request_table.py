"""`RequestTable`: idempotent commits, indexes, running totals, bounded memory, explicit event loss."""

from __future__ import annotations

import pytest

from elastic_llm.control.requests import EventsLostError, RequestRecord, RequestStatus, RequestTable
from elastic_llm.sampling import SamplingParams


def _record(i: int, client: str = "c", arrival: float = 0.0) -> RequestRecord:
    return RequestRecord(f"q{i}", client, (1, 2), SamplingParams(max_new_tokens=4), arrival)


def test_indexes_follow_assign_requeue_and_finish() -> None:
    table = RequestTable()
    for i in range(3):
        table.add(_record(i, arrival=float(i)))
    assert [r.request_id for r in table.queued()] == ["q0", "q1", "q2"]
    table.assign("q0", "r1")
    table.assign("q1", "r1")
    assert table.count_unfinished("r1") == 2 and [r.request_id for r in table.queued()] == ["q2"]
    table.commit("q0", 0, [5, 6], now=1.0)
    table.requeue("q0", lost_kv=True)
    assert table.count_unfinished("r1") == 1 and table.get("q0").status is RequestStatus.QUEUED
    assert table.totals.tokens_recomputed == 2 and table.totals.requests_restarted == 1
    table.restart("q0")
    assert table.get("q0").committed == [] and table.totals.tokens_committed == 0
    table.assign("q1", "r2")  # moved by a migration
    assert table.count_unfinished("r1") == 0 and table.count_unfinished("r2") == 1
    assert table.finish("q1", "length", "", now=3.0) and not table.finish("q1", "length", "", now=4.0)
    assert table.count_unfinished("r2") == 0 and table.totals.finished == 1
    assert len(table.unfinished()) == 2


def test_finished_records_beyond_the_window_are_pruned_into_the_totals() -> None:
    table = RequestTable(max_finished=5, latency_window=4)
    for i in range(20):
        table.add(_record(i, arrival=float(i)))
        table.assign(f"q{i}", "r")
        table.commit(f"q{i}", 0, [7, 7, 7], now=i + 0.5)
        table.finish(f"q{i}", "length", "", now=i + 2.0)
    assert len(table) == 5 and "q0" not in table and "q19" in table
    totals = table.totals
    assert (totals.accepted, totals.finished, totals.tokens_finished, totals.tokens_committed) == (20, 20, 60, 60)
    assert totals.latency_sum_s == pytest.approx(40.0) and list(table.latencies) == [2.0] * 4
    assert totals.ttft_count == 20 and table.arrived_since(15.0) == 5


def test_a_client_too_far_behind_gets_an_error_not_a_gap() -> None:
    table = RequestTable(max_events_per_client=3)
    table.add(_record(0))
    table.assign("q0", "r")
    for step in range(5):
        table.commit("q0", step, [step], now=1.0)
    assert [e.seq for e in table.events_since("c", 2)] == [2, 3, 4]
    with pytest.raises(EventsLostError, match="2 events were dropped"):
        table.events_since("c", 0)
    assert table.events_since("c", 5) == []


def test_delivered_events_are_dropped_so_a_client_that_keeps_up_holds_a_bounded_log() -> None:
    table = RequestTable(max_events_per_client=1000)
    table.add(_record(0))
    table.assign("q0", "r")
    cursor = 0
    for step in range(50):
        table.commit("q0", step, [step], now=1.0)
        events = table.events_since("c", cursor)
        assert [e.token_ids for e in events] == [(step,)]
        cursor = events[-1].seq + 1
    table.events_since("c", cursor)  # the last answer acknowledged
    assert len(table._events["c"]) == 0  # noqa: SLF001 - the log itself
    table.commit("q0", 50, [50], now=1.0)
    assert [e.seq for e in table.events_since("c", cursor)] == [50]


def test_a_gap_is_refused_and_a_repeat_merges() -> None:
    table = RequestTable()
    table.add(_record(0))
    table.assign("q0", "r")
    assert table.commit("q0", 0, [1, 2], now=1.0)
    assert not table.commit("q0", 3, [9], now=1.0)  # would leave a gap
    assert table.commit("q0", 0, [1, 2, 3], now=1.0)  # a resumed replica re-sends everything
    assert table.get("q0").committed == [1, 2, 3] and table.totals.tokens_committed == 3


def test_a_table_for_the_simulator_keeps_no_event_log_and_the_config_refuses_negative_sizes() -> None:
    from elastic_llm.control import FleetConfig

    table = RequestTable(max_events_per_client=0)
    table.add(_record(0))
    table.assign("q0", "r")
    assert table.commit("q0", 0, [4, 5], now=1.0) and table.finish("q0", "length", "", now=2.0)
    assert table.events_since("c", 0) == [] and table.totals.tokens_finished == 2
    assert not table.has_queued()
    FleetConfig(max_events_per_client=0)
    with pytest.raises(ValueError, match="max_events_per_client must be an integer >= 0"):
        FleetConfig(max_events_per_client=-1)
    with pytest.raises(ValueError, match="max_finished_records must be an integer >= 1"):
        FleetConfig(max_finished_records=0)
