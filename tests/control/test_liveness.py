"""A replica that holds requests and goes silent is broken after `stall_timeout_s`; busy, idle
and talking replicas are left alone (`control/liveness.py`)."""

from __future__ import annotations

from elastic_llm.control import FleetConfig
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins

from .harness import Harness


def _two_replicas(stall: float = 30.0) -> Harness:
    h = Harness("spotserve", FleetConfig(stall_timeout_s=stall))
    h.join("a", "b")
    h.submit("q0", "q1")
    for assign in h.of(ins.AssignRequests):
        h.send(ev.RequestsAssigned(assign.op))
    return h


def test_a_silent_replica_with_requests_is_broken_and_its_requests_resume_elsewhere() -> None:
    h = _two_replicas()
    silent, talking = h.owner("q0"), h.owner("q1")
    assert silent != talking
    start = h.now
    assert h.last(ins.WakeAt).time == start + 30.0  # the check asks for its own timer
    for second in range(5, 30, 5):  # one replica keeps committing, the other says nothing
        h.now = start + second
        h.commit(talking, {"q1": (second // 5 - 1, [7])})
    before = len(h.out)
    h.tick(start + 30.0)
    assert silent not in h.fleet.replicas and talking in h.fleet.replicas
    silent_worker = next(a for a in "ab" if a != h.fleet.replicas[talking].leader)
    assert h.of(ins.RestartWorkers, before) == [ins.RestartWorkers((silent_worker,))]  # fenced
    assert ins.StopReplica(silent) in h.out[before:]
    assert h.owner("q0") == talking  # resumed on the replica that is alive
    assert h.fleet.table.get("q0").committed == []  # (it had committed nothing)


def test_idle_busy_and_talking_replicas_are_not_judged_and_zero_turns_the_check_off() -> None:
    h = _two_replicas()
    replicas = set(h.fleet.replicas)
    h.tick(h.now + 29.0)  # below the limit
    assert set(h.fleet.replicas) == replicas
    for replica in list(h.fleet.replicas):  # both finish their request: idle from now on
        request = h.fleet.table.unfinished(replica)[0].request_id
        h.commit(replica, {}, finished={request: [7] * 50})
    h.tick(h.now + 1000.0)
    assert set(h.fleet.replicas) == replicas and not h.of(ins.RestartWorkers)
    h.submit("q2")  # an assignment under way is the operation's to judge, not the stall check's
    h.tick(h.now + 1000.0)
    assert set(h.fleet.replicas) == replicas

    off = _two_replicas(stall=0.0)
    off.tick(off.now + 10_000.0)
    assert len(off.fleet.replicas) == 2 and not off.of(ins.RestartWorkers)
