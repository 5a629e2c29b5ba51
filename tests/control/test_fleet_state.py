"""`FleetState` on hand-built event sequences: every policy's decisions, in milliseconds, no Dask."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_llm.control import POLICY_NAMES, FleetConfig, FleetState, UnknownPolicyError, policy_by_name
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.control.requests import RequestStatus
from elastic_llm.control.shape_choice import ShapeChoice

from .harness import Harness


def _serving(policy: str, workers: str = "abc", requests: int = 6, **config: object) -> Harness:
    """Whole-model replicas on `workers`, `requests` requests dispatched and 5 tokens into each."""
    h = Harness(policy, FleetConfig(**config))  # type: ignore[arg-type]
    h.join(*workers)
    h.submit(*(f"q{i}" for i in range(requests)))
    for replica in list(h.fleet.replicas):
        owned = {r.request_id: (0, [7] * 5) for r in h.fleet.table.unfinished(replica)}
        h.commit(replica, owned)
    return h


def test_unknown_policy_names_are_refused_with_the_choices() -> None:
    with pytest.raises(UnknownPolicyError, match="spotserve-no-mapper"):
        FleetState("spotserv")
    assert set(POLICY_NAMES) >= {"spotserve", "reroute", "reparallelize", "spotserve-no-adaptive",
                                 "spotserve-no-planner", "spotserve-no-arranger", "spotserve-no-mapper"}
    assert policy_by_name("spotserve-no-arranger").arranger is False  # type: ignore[attr-defined]


def test_the_control_package_imports_no_torch_or_dask() -> None:
    code = ("import sys, elastic_llm.control, elastic_llm.control.machine; "
            "bad = [m for m in ('torch', 'dask', 'distributed') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requests_go_to_the_least_loaded_ready_replica_and_commits_count_only_from_the_owner() -> None:
    h = Harness()
    h.join("a", "b")
    h.submit("q0", "q1")
    assigned = h.of(ins.AssignRequests)
    assert sorted(a.replica_id for a in assigned) == sorted(h.fleet.replicas)  # one each
    owner = h.owner("q0")
    other = next(r for r in h.fleet.replicas if r != owner)
    h.commit(other, {"q0": (0, [5, 5])})  # not the owner: refused
    assert h.fleet.table.get("q0").committed == []
    h.commit(owner, {"q0": (0, [5, 5])})
    assert h.fleet.table.get("q0").committed == [5, 5]
    assert h.last(ins.NotifyClients).clients == ("client-1",)


def test_a_commit_not_from_the_replica_s_own_worker_is_refused_as_forged() -> None:
    from elastic_llm.control.messages import FinishCommit, LoopCounters, ReplicaCommit

    h = Harness()
    h.join("a", "b")
    h.submit("q0")
    owner = h.owner("q0")
    forged = ReplicaCommit(owner, LoopCounters(), finished=(FinishCommit("q0", "stop", "FORGED", (1,)),))
    other = next(r.leader for r in h.fleet.replicas.values() if r.replica_id != owner)
    h.send(ev.TokensCommitted(forged, origin=other))
    h.send(ev.TokensCommitted(ReplicaCommit("r99", LoopCounters(), finished=forged.finished), origin="a"))
    record = h.fleet.table.get("q0")
    assert record.status is RequestStatus.RUNNING and record.text == ""
    assert h.fleet.status(h.now)["commits_refused"] == 2


def test_a_join_takes_a_ready_peers_weights_under_spotserve_and_the_checkpoint_under_reroute() -> None:
    for policy, peer in (("spotserve", True), ("reroute", False)):
        h = Harness(policy)
        h.join("a")
        h.send(ev.WorkerJoined("b"))
        start = h.last(ins.StartReplica)
        assert start.leader == "b" and (start.weights_from == h.replica_on("a")) is peer


def test_reparallelize_reloads_every_replica_and_restarts_every_request_on_a_join() -> None:
    h = _serving("reparallelize", "ab", requests=4)
    h.join("c", ready=False)
    reloads = h.of(ins.ReloadReplica)
    assert len(reloads) == 2
    assert all(h.fleet.table.get(f"q{i}").committed == [] for i in range(4))
    assert all(h.fleet.table.get(f"q{i}").restarts == 1 for i in range(4))
    before = len(h.out)
    for reload in reloads:
        h.ready(reload)
    assert h.of(ins.AssignRequests, before)  # requeued requests are dispatched again
    assert h.fleet.status(h.now)["reloads"] == 2


@pytest.mark.parametrize("policy", ["spotserve", "reroute"])
def test_a_whole_model_worker_killed_without_notice(policy: str) -> None:
    h = _serving(policy)
    victim = h.replica_on("a")
    lost = [r.request_id for r in h.fleet.table.unfinished(victim)]
    before = len(h.out)
    h.send(ev.WorkerLost("a"))
    assert victim not in h.fleet.replicas
    for request_id in lost:
        record = h.fleet.table.get(request_id)
        assert record.restarts == 1 and record.tokens_recomputed == 5
        # spotserve resumes from the committed tokens; reroute restarts from scratch
        assert record.committed == ([7] * 5 if policy == "spotserve" else [])
        assert record.replica in h.fleet.replicas
    resumed = [w for a in h.of(ins.AssignRequests, before) for w in a.requests]
    assert {w.request_id for w in resumed} == set(lost)
    assert all(len(w.committed) == (5 if policy == "spotserve" else 0) for w in resumed)


def test_a_notice_with_enough_grace_decodes_on_then_migrates_every_request_with_its_kv() -> None:
    h = _serving("spotserve")
    source = h.replica_on("a")
    ids = sorted(r.request_id for r in h.fleet.table.unfinished(source))
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    assert h.fleet.replicas[source].state.value == "draining"
    assert not h.of(ins.MigrateRequests)  # the arrangement lets it decode first
    wake = h.last(ins.WakeAt).time
    assert h.now < wake < h.now + 30.0
    h.tick(wake)
    migrations = h.of(ins.MigrateRequests)
    assert sorted(i for m in migrations for i in m.request_ids) == ids
    assert {m.target for m in migrations} == set(h.fleet.replicas) - {source}
    for migration in migrations:  # the target owns them before the pull
        assert all(h.owner(i) == migration.target for i in migration.request_ids)
        h.moved(migration.op, *migration.request_ids)
    (notice,) = h.fleet.status(h.now)["notices"]
    assert notice["migrated"] == len(ids) and notice["recomputed"] == 0
    assert all(h.fleet.table.get(i).tokens_recomputed == 0 for i in ids)


def test_a_notice_with_too_little_grace_sends_the_requests_whose_kv_cannot_move_to_recompute() -> None:
    h = _serving("spotserve", kv_bandwidth=1e3, migration_margin_s=0.5)  # 5 KB/s: KV barely moves
    source = h.replica_on("a")
    ids = {r.request_id for r in h.fleet.table.unfinished(source)}
    h.send(ev.WorkerNoticed("a", h.now + 1.0))
    h.tick(h.now + 1.0)
    moved = {i for m in h.of(ins.MigrateRequests) for i in m.request_ids}
    recomputing = {i for i in ids if h.fleet.table.get(i).tokens_recomputed > 0}
    assert recomputing and moved | recomputing == ids and not moved & recomputing


def test_reroute_restarts_a_noticed_replicas_requests_just_before_the_deadline() -> None:
    h = _serving("reroute", migration_margin_s=2.0)
    source = h.replica_on("a")
    ids = [r.request_id for r in h.fleet.table.unfinished(source)]
    h.send(ev.WorkerNoticed("a", h.now + 10.0))
    assert h.last(ins.WakeAt).time == pytest.approx(h.now + 8.0)
    h.tick(h.now + 8.0)
    assert not h.of(ins.MigrateRequests)
    assert all(h.fleet.table.get(i).committed == [] and h.owner(i) != source for i in ids)
    assert h.of(ins.CancelRequests)[-1].replica_id == source


def test_without_the_arranger_spotserve_moves_everything_at_the_notice() -> None:
    h = _serving("spotserve-no-arranger")
    source = h.replica_on("a")
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    assert {i for m in h.of(ins.MigrateRequests) for i in m.request_ids} == {
        r.request_id for r in h.fleet.table.unfinished() if r.replica != source and r.request_id in
        {i for m in h.of(ins.MigrateRequests) for i in m.request_ids}}
    assert h.of(ins.MigrateRequests)  # at once, no wait


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_failure_mid_migration_requeues_each_request_exactly_once(side: str) -> None:
    h = _serving("spotserve-no-arranger")
    source_worker = "a"
    h.send(ev.WorkerNoticed(source_worker, h.now + 30.0))
    migration = h.of(ins.MigrateRequests)[0]
    assert migration.source_deadline == h.now + 30.0  # the pull gives up once its source is gone
    target_worker = h.fleet.replicas[migration.target].leader
    dead = source_worker if side == "source" else target_worker
    h.send(ev.WorkerLost(dead))
    if side == "source":  # the target's bounded pull answers: here, it failed
        assert all(h.owner(i) == migration.target for i in migration.request_ids)
        h.send(ev.OperationFailed(migration.op, "the source is gone"))
    h.send(ev.OperationFailed(migration.op, "late failure"))  # answer to a closed op: ignored
    h.moved(migration.op, *migration.request_ids)  # a late success: ignored too
    for request_id in migration.request_ids:
        record = h.fleet.table.get(request_id)
        assert record.restarts == 1, request_id  # exactly once
        assert record.replica in h.fleet.replicas and h.fleet.replicas[record.replica].leader != dead
    assert h.fleet.kv_bytes_migrated == 0


def test_a_pull_that_completed_as_its_source_died_keeps_the_requests_on_the_target() -> None:
    h = _serving("spotserve-no-arranger")
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    migration = h.of(ins.MigrateRequests)[0]
    h.send(ev.WorkerLost("a"))  # the source died right after it answered the pull
    assigned = len(h.of(ins.AssignRequests))
    h.moved(migration.op, *migration.request_ids)
    assert len(h.of(ins.AssignRequests)) == assigned  # nothing started a second time
    for request_id in migration.request_ids:
        record = h.fleet.table.get(request_id)
        assert record.replica == migration.target and record.restarts == 0, request_id
    assert h.fleet.kv_bytes_migrated > 0


def test_a_migration_that_never_answers_times_out_and_its_requests_requeue_once() -> None:
    h = _serving("spotserve-no-arranger", transfer_slack_s=5.0)
    h.send(ev.WorkerNoticed("a", h.now + 10.0))
    migration = h.of(ins.MigrateRequests)[0]
    h.tick(h.now + 9.0)
    assert all(h.owner(i) == migration.target for i in migration.request_ids)
    h.tick(h.now + 7.0)  # past deadline + slack
    assert all(h.fleet.table.get(i).restarts == 1 for i in migration.request_ids)
    assert h.fleet.status(h.now)["open_operations"] == len(h.fleet.ops)
    assert h.fleet.notices  # the notice is recorded even so


def test_a_cancel_during_migration_is_final() -> None:
    h = _serving("spotserve-no-arranger")
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    migration = h.of(ins.MigrateRequests)[0]
    victim = migration.request_ids[0]
    h.send(ev.RequestsCancelled((victim,)))
    assert h.last(ins.CancelRequests) == ins.CancelRequests(migration.target, (victim,))
    h.send(ev.OperationFailed(migration.op, "source died"))
    record = h.fleet.table.get(victim)
    assert record.status is RequestStatus.FINISHED and record.finish_reason == "abort"
    assert not any(victim in {w.request_id for w in a.requests} for a in h.of(ins.AssignRequests)[-3:])


def test_an_assignment_that_fails_requeues_only_what_that_replica_still_owns() -> None:
    h = Harness()
    h.join("a", "b")
    h.submit("q0")
    assign = h.last(ins.AssignRequests)
    h.send(ev.WorkerLost(h.fleet.replicas[assign.replica_id].leader))  # requeued and re-dispatched
    new_owner = h.owner("q0")
    h.send(ev.OperationFailed(assign.op, "replica died"))  # closed already: ignored
    assert h.owner("q0") == new_owner and h.fleet.table.get("q0").restarts == 1


def test_a_client_gone_past_the_reconnect_window_has_its_requests_aborted_and_its_log_kept() -> None:
    h = _serving("spotserve", requests=2, client_log_ttl_s=60.0, client_reconnect_s=10.0)
    gone_at = h.now
    h.send(ev.ClientGone("client-1"))
    assert not any(r.status is RequestStatus.FINISHED for r in h.fleet.table.records())  # still running
    assert ins.WakeAt(gone_at + 10.0) in h.out  # the state machine asks to be woken for the aborts
    h.tick(gone_at + 10.0)
    assert all(r.status is RequestStatus.FINISHED for r in h.fleet.table.records())
    assert h.of(ins.CancelRequests)
    h.tick(h.now + 30.0)  # reconnected within the TTL: the aborts are in its log
    finished = [e for e in h.fleet.table.events_since("client-1", 0) if e.kind == "finished"]
    assert sorted(e.request_id for e in finished) == ["q0", "q1"]
    assert {e.finish_reason for e in finished} == {"abort"}
    h.tick(h.now + 31.0)  # past the TTL: the log is gone
    assert h.fleet.table.events_since("client-1", 0) == []


def test_a_client_back_within_the_reconnect_window_loses_nothing() -> None:
    h = _serving("spotserve", requests=2, client_reconnect_s=10.0)
    h.send(ev.ClientGone("client-1"))
    assert h.fleet.clients.away == {"client-1"}
    h.send(ev.ClientBack("client-1"), at=h.now + 9.0)
    h.tick(h.now + 6.0)  # past the window's end
    assert h.fleet.clients.away == frozenset()
    assert not h.of(ins.CancelRequests)
    assert not any(r.status is RequestStatus.FINISHED for r in h.fleet.table.records())
    for replica in list(h.fleet.replicas):  # the replicas finish them and the client's log has it
        h.commit(replica, {}, finished={r.request_id: [7] * 6 for r in h.fleet.table.unfinished(replica)})
    finished = [e for e in h.fleet.table.events_since("client-1", 0) if e.kind == "finished"]
    assert sorted(e.request_id for e in finished) == ["q0", "q1"]
    assert {e.finish_reason for e in finished} == {"length"}


# ------------------------------------------------------------------ sharded replicas
def _sharded(policy: str, workers: str = "abc", parallel: tuple[int, int] = (2, 1)) -> Harness:
    h = Harness(policy, FleetConfig(parallel=parallel))
    h.join(*workers)
    replica = h.replica_on("a")
    for request_id in ("q0", "q1", "q2"):  # all on the replica led by a (the others kept idle)
        h.submit(request_id)
        if h.owner(request_id) != replica:
            h.fleet.table.assign(request_id, replica)
    h.commit(replica, {f"q{i}": (0, [3, 3]) for i in range(3)})
    return h


def test_a_fixed_shape_places_one_replica_per_p_times_m_free_workers() -> None:
    h = _sharded("spotserve", "abcde")
    shapes = sorted(r.shards for r in h.fleet.replicas.values())
    assert shapes == [("a", "b"), ("c", "d")] and h.fleet.free_workers() == ["e"]


def test_a_second_sharded_replica_takes_a_ready_ones_weights_under_spotserve_only() -> None:
    for policy, peer in (("spotserve", True), ("reroute", False)):
        h = Harness(policy, FleetConfig(parallel=(2, 1)))
        h.join("a", "b")
        first = h.last(ins.StartReplica)
        assert first.weights_from is None  # nothing is ready yet: the checkpoint
        h.join("c", "d", ready=False)
        second = h.last(ins.StartReplica)
        assert second.replica_id != first.replica_id and set(second.shards) == {"c", "d"}
        assert second.weights_from == (first.replica_id if peer else None), policy
        h.ready(second, peer_bytes=1234 if peer else 0)
        status = h.fleet.status(h.now)
        assert status["weight_bytes_from_peers"] == (1234 if peer else 0)
        assert [r["weights"] for r in status["replicas"]] == ["checkpoint", "peer" if peer else "checkpoint"]


def test_a_sharded_peer_about_to_lose_a_worker_sends_no_weights() -> None:
    h = Harness("spotserve", FleetConfig(parallel=(2, 1)))
    h.join("a", "b", "c")
    (ready,) = h.fleet.replicas
    h.send(ev.WorkerNoticed("b", h.now + 60.0))  # its shard worker leaves: it is resharded
    h.join("d", "e")
    starts = h.of(ins.StartReplica)
    assert len(starts) == 2 and set(starts[1].shards) == {"d", "e"}
    assert h.fleet.replicas[ready].state.value == "switching" and starts[1].weights_from is None


def test_a_noticed_leader_s_successor_takes_weights_from_another_ready_replica() -> None:
    h = Harness("spotserve", FleetConfig(parallel=(2, 1)))
    h.join("a", "b", "c", "d", "e")
    old, other = h.replica_on("a"), h.replica_on("c")
    h.send(ev.WorkerNoticed("a", h.now + 20.0))
    successor = h.last(ins.StartReplica)
    assert not successor.build and set(successor.shards) == {"b", "e"}
    assert successor.weights_from == other != old  # never the replica it succeeds


def test_a_noticed_shard_worker_makes_spotserve_reshard_and_reroute_dissolve() -> None:
    h = _sharded("spotserve")
    (replica,) = h.fleet.replicas.values()
    h.send(ev.WorkerNoticed("b", h.now + 20.0))
    reshard = h.last(ins.Reshard)
    assert reshard.parallel == (2, 1) and set(reshard.workers) == {"a", "c"} and reshard.workers[0] == "a"
    assert h.fleet.free_workers() == []  # c is reserved for the switch
    h.resharded(reshard, (2, 1))
    assert replica.shards == ("a", "c") and replica.state.value == "ready"
    (notice,) = h.fleet.notices
    assert notice.worker == "b" and notice.migrated == 3 and notice.recomputed == 0

    h = _sharded("reroute")
    (old,) = h.fleet.replicas
    h.send(ev.WorkerNoticed("b", h.now + 10.0))
    assert not h.of(ins.Reshard)
    h.tick(h.now + 10.0)
    assert all(h.fleet.table.get(f"q{i}").committed == [] for i in range(3))
    retire = h.last(ins.RetireReplica)
    assert retire.replica_id == old and not h.of(ins.StartReplica)[1:]  # a and c wait for the stop
    h.send(ev.ReplicaStopped(retire.op))
    assert old not in h.fleet.replicas
    assert set(h.last(ins.StartReplica).shards) == {"a", "c"}  # the leader and the free worker


def test_a_noticed_leader_hands_every_request_with_its_kv_to_a_successor() -> None:
    h = _sharded("spotserve")
    (old,) = h.fleet.replicas
    h.send(ev.WorkerNoticed("a", h.now + 20.0))
    start = h.last(ins.StartReplica)
    assert not start.build and set(start.shards) == {"b", "c"}
    h.send(ev.ReplicaCreated(start.op))
    h.tick(h.last(ins.WakeAt).time)
    hand_over = h.last(ins.HandOver)
    assert hand_over.source == old and hand_over.successor == start.replica_id
    assert all(h.owner(i) == start.replica_id for i in hand_over.request_ids)
    h.moved(hand_over.op, *hand_over.request_ids)
    retire = h.last(ins.RetireReplica)
    assert retire.replica_id == old and not h.of(ins.BuildReplica)  # its workers are not free yet
    before = len(h.out)
    h.send(ev.WorkerLost("a"))  # the noticed leader dies at its deadline while the old one stops
    assert not h.of(ins.RestartWorkers, before) and start.replica_id in h.fleet.replicas  # b not fenced
    h.send(ev.ReplicaStopped(retire.op))
    assert old not in h.fleet.replicas
    h.ready(h.last(ins.BuildReplica))
    assert h.fleet.replicas[start.replica_id].state.value == "ready"
    (move,) = h.fleet.reshards
    assert move["leader_moved"] and move["kv_bytes"] == 300
    assert h.fleet.notices[0].migrated == 3
    assert all(h.fleet.table.get(f"q{i}").restarts == 0 for i in range(3))


@pytest.mark.parametrize("created", [False, True])
def test_a_successor_whose_worker_is_noticed_before_it_builds_is_dropped_and_planned_again(created: bool) -> None:
    """An instance's workers are noticed one by one, the leader first: the successor made on the
    leader's sibling is dropped when the sibling's notice comes, and the source plans its notice
    again without the leaving workers (no chain of successors on workers the source holds)."""
    h = _sharded("spotserve", "abcde")  # replicas (a, b) and (c, d); e is free
    old = h.replica_on("a")
    h.send(ev.WorkerNoticed("a", h.now + 20.0))
    first = h.last(ins.StartReplica)
    assert set(first.shards) == {"b", "e"} and not first.build
    if created:
        h.send(ev.ReplicaCreated(first.op))
    before = len(h.out)
    h.send(ev.WorkerNoticed("b", h.now + 20.0))  # a's sibling on the same instance
    assert first.replica_id not in h.fleet.replicas
    assert ins.StopReplica(first.replica_id) in h.out[before:]
    assert not h.of(ins.RestartWorkers, before)  # a dropped successor is no broken start
    assert not [s for s in h.of(ins.StartReplica, before) if {"a", "b"} & set(s.shards)]
    held = [w for r in h.fleet.replicas.values() if r.replica_id != old for w in r.workers]
    assert len(held) == len(set(held))  # every worker in one replica at most (besides the source)
    second = h.last(ins.StartReplica)  # planned again: on the one free worker left
    assert second.replica_id != first.replica_id and second.shards == ("e",) and not second.build
    h.send(ev.ReplicaCreated(second.op))
    h.tick(h.last(ins.WakeAt).time)
    hand_over = h.last(ins.HandOver)
    assert hand_over.source == old and hand_over.successor == second.replica_id
    assert set(hand_over.request_ids) == {"q0", "q1", "q2"}


def test_a_killed_shard_worker_loses_the_replica_and_fences_its_other_workers() -> None:
    h = _sharded("spotserve", "abcd")
    (old,) = [r for r in h.fleet.replicas.values() if "b" in r.shards]
    h.send(ev.WorkerLost("b"))
    assert old.replica_id not in h.fleet.replicas
    assert h.fleet.workers["a"].health.value == "suspect"  # its shard group is broken
    assert h.last(ins.RestartWorkers) == ins.RestartWorkers(("a",))
    assert h.last(ins.StopReplica).replica_id == old.replica_id
    assert all(h.fleet.table.get(f"q{i}").committed == [3, 3] for i in range(3))  # resumes


@pytest.mark.parametrize("policy", ["spotserve", "reroute"])
def test_a_killed_sharded_leader_fences_its_shards_and_a_new_replica_forms_on_healthy_workers(policy: str) -> None:
    h = _sharded(policy, "abcde")  # replicas (a, b) and (c, d); e is free
    before = len(h.out)
    h.send(ev.WorkerLost("a"))
    assert h.of(ins.RestartWorkers, before) == [ins.RestartWorkers(("b",))]  # b's shard lingers: fenced
    assert h.fleet.workers["b"].health.value == "suspect"
    assert not h.of(ins.StartReplica, before)  # e alone holds no (2, 1), and b is never reused as it is
    h.send(ev.WorkerLost("b"))  # the restart: b leaves ...
    h.send(ev.WorkerJoined("b2"))  # ... and comes back as a fresh worker
    assert set(h.last(ins.StartReplica).shards) == {"b2", "e"}
    for i in range(3):  # every request of the lost replica is queued or on a live replica, once
        record = h.fleet.table.get(f"q{i}")
        assert record.restarts == 1 and (record.replica is None or record.replica in h.fleet.replicas)
        assert record.committed == ([3, 3] if policy == "spotserve" else [])


def test_a_sharded_start_that_fails_fences_and_places_elsewhere_and_stops_fencing_after_repeats() -> None:
    h = Harness("spotserve", FleetConfig(parallel=(2, 1), max_start_failures=2))
    h.join("a", "b", "c", "d", "e", "f", ready=False)
    starts = h.of(ins.StartReplica)
    assert [s.shards for s in starts] == [("a", "b"), ("c", "d"), ("e", "f")]
    before = len(h.out)
    h.send(ev.OperationFailed(starts[0].op, "no answer to 'join'"))
    assert h.of(ins.RestartWorkers, before) == [ins.RestartWorkers(("a", "b"))]
    h.send(ev.OperationFailed(starts[1].op, "no answer to 'join'"))
    before = len(h.out)
    h.send(ev.OperationFailed(starts[2].op, "no answer to 'join'"))
    assert not h.of(ins.RestartWorkers, before)  # two failures in a row: no more restarts
    assert all(w.health.value == "suspect" for w in h.fleet.workers.values())


def test_a_shard_notice_during_a_switch_waits_for_it() -> None:
    h = _sharded("spotserve", "abcde")
    (replica,) = [r for r in h.fleet.replicas.values() if r.leader == "a"]
    h.send(ev.WorkerNoticed("b", h.now + 20.0))
    first = h.last(ins.Reshard)
    h.send(ev.WorkerNoticed("a", h.now + 20.0))  # the leader too, mid-switch: deferred
    assert not [s for s in h.of(ins.StartReplica) if not s.build]
    h.resharded(first, (2, 1))
    assert [s for s in h.of(ins.StartReplica) if not s.build]  # now the successor is made
    assert replica.noticed


def test_a_reshard_that_fails_breaks_the_replica_and_its_requests_recompute() -> None:
    h = _sharded("spotserve")
    h.send(ev.WorkerNoticed("b", h.now + 20.0))
    reshard = h.last(ins.Reshard)
    h.send(ev.OperationFailed(reshard.op, "shard died"))
    assert not h.fleet.replicas
    assert all(h.fleet.table.get(f"q{i}").tokens_recomputed == 2 for i in range(3))
    (notice,) = h.fleet.notices
    assert notice.migrated == 0 and notice.recomputed == 3


def test_ablations_reach_the_reshard_instruction() -> None:
    for policy, mapper, progressive in (("spotserve", True, True), ("spotserve-no-mapper", False, True),
                                        ("spotserve-no-planner", True, False)):
        h = _sharded(policy)
        h.send(ev.WorkerNoticed("b", h.now + 20.0))
        reshard = h.last(ins.Reshard)
        assert (reshard.use_mapper, reshard.progressive) == (mapper, progressive), policy


def test_auto_shapes_wait_for_the_model_spec_then_follow_the_load() -> None:
    import dataclasses

    from elastic_llm.control.shapes import CPU_WORKER
    from elastic_llm.model.spec import ModelSpec
    from elastic_llm.planning.profiles import AnalyticProfile, Link

    slow = 1e4
    device = dataclasses.replace(CPU_WORKER, fp32_flops=CPU_WORKER.fp32_flops / slow,
                                 fp16_flops=CPU_WORKER.fp16_flops / slow,
                                 memory_bandwidth=CPU_WORKER.memory_bandwidth / slow)
    fast = Link(bandwidth=1e12, latency=1e-9)
    spec = ModelSpec.from_hf_config({  # the Dask sharded tests' uneven checkpoint
        "model_type": "llama", "hidden_size": 48, "head_dim": 8, "intermediate_size": 192,
        "num_attention_heads": 6, "num_key_value_heads": 3, "tie_word_embeddings": True,
        "num_hidden_layers": 3, "vocab_size": 320, "max_position_embeddings": 256, "torch_dtype": "float32"})
    h = Harness("spotserve", FleetConfig(parallel=None, max_batch_size=4, memory_budget_bytes=2_000_000,
                                         load_check_s=0.5),
                profile=AnalyticProfile("slow device", device, 1, fast, fast, 4))
    h.join("a", "b", "c", "d", ready=False)
    (describe,) = h.of(ins.DescribeModel)
    assert not h.of(ins.StartReplica)
    h.send(ev.ModelDescribed(describe.op, spec))
    (start,) = h.of(ins.StartReplica)
    assert start.parallel == (1, 4)  # idle: one replica over all four
    h.ready(start)
    h.submit(*(f"q{i}" for i in range(40)), new_tokens=24)
    h.tick(h.now + 1.0)
    h.tick(h.now + 1.0)
    (replan,) = h.fleet.load_replans
    assert replan["planned_rate"] == 0.0 and replan["rate"] >= 0.5
    reshard = h.last(ins.Reshard)
    assert reshard.parallel == (1, 1)
    h.resharded(reshard, (1, 4))
    assert sorted(s.parallel for s in h.of(ins.StartReplica)[1:]) == [(1, 1)] * 3


def test_without_adaptive_configuration_the_first_shape_is_kept_or_nothing() -> None:
    from elastic_llm.control.shape_choice import ShapeChoice
    from elastic_llm.model.spec import described_model

    choice = ShapeChoice(None, 4, adaptive=False)
    choice.spec = described_model("opt-6.7b")
    first = choice.shape_for(4, 10 * 2**30, rate=0.0)
    assert first is not None and first[0] * first[1] >= 3
    assert choice.shape_for(8, 10 * 2**30, rate=5.0) == first  # kept for good
    assert choice.shape_after_loss(first, first[0] * first[1] - 1, 10 * 2**30, rate=0.0) is None


class _ShapesByWorkers(ShapeChoice):
    """The optimizer's choice stubbed: (1, 1) on up to two workers, (1, 2) from three."""

    def __init__(self) -> None:
        super().__init__(None, 4, adaptive=True)
        self.spec = object()

    def shape_for(self, workers: int, memory_bytes: int, rate: float,
                  current: tuple[int, int] | None = None) -> tuple[int, int] | None:
        return (1, 1) if workers <= 2 else (1, 2)


def test_a_replica_that_sends_weights_to_a_starting_one_is_switched_only_once_that_one_is_ready() -> None:
    h = Harness("spotserve", FleetConfig(parallel=None, max_batch_size=4))
    h.fleet.shapes = _ShapesByWorkers()
    h.join("a")
    (first,) = h.of(ins.StartReplica)
    h.ready(first)
    h.join("b", ready=False)
    second = h.last(ins.StartReplica)
    assert second.weights_from == first.replica_id  # b's replica pulls its slices from a's
    h.join("c", ready=False)  # three workers: the shape becomes (1, 2)
    assert not [r for r in h.of(ins.Reshard) if r.replica_id == first.replica_id]  # a's shards keep theirs
    h.ready(second)
    (reshard,) = [r for r in h.of(ins.Reshard) if r.replica_id == first.replica_id]
    assert reshard.parallel == (1, 2) and "c" in reshard.workers
