"""`FleetHistory`: windowed figures, instance lives, events, and every buffer's bound."""

from __future__ import annotations

import pytest

from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.history import FleetHistory, HistoryBoundsError

from .harness import Harness


def _finish(h: Harness, replica: str, *request_ids: str) -> None:
    h.commit(replica, {}, finished={r: [7] * 5 for r in request_ids})


def test_latency_percentiles_cover_only_the_requests_finished_in_each_window() -> None:
    h = Harness()
    history = FleetHistory(interval_s=1.0)
    h.join("a", market="spot", price_per_hour=1.9)
    (replica,) = h.fleet.replicas
    history.observe(h.fleet, h.now)
    h.submit("slow")
    h.now += 10.0
    _finish(h, replica, "slow")  # 10 s
    first = history.observe(h.fleet, h.now)
    h.submit("fast")
    h.now += 1.0
    _finish(h, replica, "fast")  # 1 s
    second = history.observe(h.fleet, h.now)
    assert first is not None and second is not None
    assert first.finished == 1 and first.latency_p99_s == pytest.approx(10.0)
    assert second.finished == 1 and second.latency_p99_s == pytest.approx(1.0)  # not the mean of both
    assert second.tokens_per_s == pytest.approx(5.0)  # 5 tokens committed in 1 s
    assert second.replicas == 1 and second.configuration == "1 x (P=1, M=1)"
    assert second.spot_instances == 1
    assert history.observe(h.fleet, h.now + 0.5) is None  # within interval_s: no sample


def test_instances_stay_on_the_timeline_after_a_notice_and_a_death() -> None:
    h = Harness()
    history = FleetHistory(interval_s=0.0)
    h.join("a", "b", market="spot", price_per_hour=1.9)
    h.join("c")  # no market given: the event's default
    history.observe(h.fleet, h.now)
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    history.observe(h.fleet, h.now + 1)
    h.send(ev.WorkerLost("a"), at=h.now + 30.0)
    h.send(ev.WorkerLost("b"))
    history.observe(h.fleet, h.now)
    lives = {life["worker"]: life for life in history.to_dict()["instances"]}
    assert lives["a"]["end"] == "preempted" and lives["a"]["noticed_at"] == 1001.0
    assert lives["a"]["deadline"] == 1030.0 and lives["a"]["left_at"] == 1030.0
    assert lives["b"]["end"] == "lost" and lives["b"]["noticed_at"] is None
    assert lives["c"]["left_at"] is None and lives["c"]["state"] == "up"
    kinds = [(e.kind, e.subject) for e in history.events if e.subject in "abc"]
    assert kinds[:3] == [("joined", "a"), ("joined", "b"), ("joined", "c")]
    assert ("notice", "a") in kinds and ("preempted", "a") in kinds and ("lost", "b") in kinds
    assert [e.detail for e in history.events if e.kind == "notice"] == ["preemption in 29 s"]
    configurations = [e.detail for e in history.events if e.kind == "configuration"]
    assert configurations[0].startswith("D=3") and configurations[-1] == "D=1: 1 x (P=1, M=1)"


def test_a_handled_notice_becomes_a_migration_event() -> None:
    h = Harness()
    history = FleetHistory(interval_s=0.0)
    h.join("a", "b")
    h.submit("q0", "q1", "q2", "q3")
    for replica in list(h.fleet.replicas):
        h.commit(replica, {r.request_id: (0, [7] * 5) for r in h.fleet.table.unfinished(replica)})
    history.observe(h.fleet, h.now)
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    h.tick(h.last(ins.WakeAt).time)
    for migration in h.of(ins.MigrateRequests):
        h.moved(migration.op, *migration.request_ids)
    history.observe(h.fleet, h.now)
    history.observe(h.fleet, h.now + 1)  # seen once, not again
    migrations = [e for e in history.events if e.kind == "migration"]
    assert len(migrations) == 1 and migrations[0].subject == "a"
    assert migrations[0].detail.startswith("2 requests moved")


def test_every_buffer_is_bounded_and_the_cursor_skips_what_a_reader_has() -> None:
    h = Harness()
    history = FleetHistory(interval_s=0.0, max_samples=5, max_events=7, max_instances=3)
    for i in range(20):
        h.send(ev.WorkerJoined(f"w{i}"), at=1000.0 + i)
        history.observe(h.fleet, h.now)
        h.send(ev.WorkerLost(f"w{i}"))
        history.observe(h.fleet, h.now + 0.5)
    assert len(history.samples) == 5 and history.samples_taken == 40
    assert len(history.events) == 7 and history.events_seen > 7
    assert len(history.instances) == 3
    assert [life.worker for life in history.instances.values()] == ["w17", "w18", "w19"]
    assert len(history.to_dict()["samples"]) == 5
    assert len(history.to_dict(since=38)["samples"]) == 2  # only the two the reader lacks
    assert history.to_dict(since=40)["samples"] == [] and history.to_dict()["cursor"] == 40


def test_held_instances_are_never_dropped_for_the_bound() -> None:
    h = Harness()
    history = FleetHistory(max_instances=2)
    h.join("a", "b", "c", "d")
    history.observe(h.fleet, h.now)
    assert len(history.instances) == 4


@pytest.mark.parametrize("kwargs", [{"max_samples": 0}, {"max_events": -1}, {"max_instances": 0},
                                    {"interval_s": float("nan")}, {"interval_s": -1.0}])
def test_bad_bounds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(HistoryBoundsError):
        FleetHistory(**kwargs)  # type: ignore[arg-type]
