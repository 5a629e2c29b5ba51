"""KV residency policy: hand-built decisions and properties over random instances."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_llm.scheduling import (
    KVResidencyPolicy,
    ResidencyConfig,
    ResidencyDecision,
    ScheduledWork,
    SchedulerOutput,
    attach_residency,
)


def policy(budget: int = 1000, **kwargs: object) -> KVResidencyPolicy:
    config = ResidencyConfig(device_budget_bytes=budget, **kwargs)  # type: ignore[arg-type]
    return KVResidencyPolicy(config)


def test_config_validation_and_keep_limit() -> None:
    assert ResidencyConfig(1000, reserve_fraction=0.1).keep_limit_bytes == 900
    assert ResidencyConfig(1000, reserve_fraction=0.1, proactive=False).keep_limit_bytes == 1000
    for bad in ({"reserve_fraction": 1.0}, {"mode": "tape"}, {"hysteresis_s": -1.0}):
        with pytest.raises(ValueError):
            ResidencyConfig(1000, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ResidencyConfig(-1)


def test_swaps_out_latest_scheduled_first_to_keep_the_reserve() -> None:
    sizes = {"a": 200, "b": 300, "c": 300, "d": 300, "e": 100}
    nxt = {"a": 0.0, "b": 5.0, "c": 2.0, "d": 9.0, "e": 7.0}
    got = policy().decide(batch=["a"], kv_bytes=sizes, on_host=set(), next_scheduled=nxt)
    # keep limit 900: a (batch) 200, then c (t=2) 300, b (t=5) 300 = 800; e (t=7) 100 = 900
    assert got.swap_out == ("d",)
    assert got.device_bytes == 900
    assert (got.swap_in, got.prefetch, got.drop, got.deferred) == ((), (), (), ())


def test_swap_out_order_is_latest_first() -> None:
    sizes = {"a": 850, "b": 100, "c": 100, "d": 100}
    nxt = {"a": 0.0, "b": 3.0, "c": 9.0, "d": 6.0}
    got = policy().decide(batch=["a"], kv_bytes=sizes, on_host=set(), next_scheduled=nxt)
    assert got.swap_out == ("c", "d", "b")


def test_batch_members_on_host_are_swapped_in_before_running() -> None:
    sizes = {"a": 300, "b": 300, "x": 500}
    nxt = {"a": 0.0, "b": 0.0, "x": 4.0}
    got = policy().decide(batch=["b", "a"], kv_bytes=sizes, on_host={"a", "b"}, next_scheduled=nxt)
    assert got.swap_in == ("b", "a")  # batch order
    assert got.swap_out == ("x",)  # 600 + 500 > 900
    assert got.device_bytes == 600


def test_prefetch_soonest_first_within_the_limit() -> None:
    sizes = {"a": 100, "h1": 300, "h2": 300, "h3": 300, "h4": 100}
    nxt = {"a": 0.0, "h1": 3.0, "h2": 1.0, "h3": 2.0, "h4": 8.0}
    got = policy().decide(
        batch=["a"], kv_bytes=sizes, on_host={"h1", "h2", "h3", "h4"}, next_scheduled=nxt
    )
    # 100 + 300 (h2) + 300 (h3) = 700; h1 would make 1000 > 900 and is skipped; h4 still fits
    assert got.prefetch == ("h2", "h3", "h4")
    assert got.device_bytes == 800
    assert got.swap_in == () and got.swap_out == ()


def test_deferred_when_the_batch_alone_exceeds_the_budget() -> None:
    sizes = {"a": 600, "b": 300, "c": 300}
    nxt = {"a": 0.0, "b": 0.0, "c": 0.0}
    got = policy().decide(batch=["a", "b", "c"], kv_bytes=sizes, on_host={"c"}, next_scheduled=nxt)
    assert got.deferred == ("c",)  # lowest priority first
    assert got.swap_in == ()
    assert got.device_bytes == 900
    out = SchedulerOutput(tuple(ScheduledWork(r, 1) for r in ("a", "b", "c")))
    attached = attach_residency(out, got)
    assert [w.request_id for w in attached.scheduled] == ["a", "b"]


def test_recompute_mode_drops_instead_of_swapping_and_never_prefetches() -> None:
    sizes = {"a": 500, "b": 300, "c": 300, "h": 50}
    nxt = {"a": 0.0, "b": 1.0, "c": 2.0, "h": 0.5}
    got = policy(mode="recompute").decide(
        batch=["a"], kv_bytes=sizes, on_host={"h"}, next_scheduled=nxt
    )
    assert got.drop == ("c",) and got.swap_out == () and got.prefetch == ()


def test_reactive_evicts_only_when_the_budget_is_exceeded() -> None:
    sizes = {"a": 200, "b": 350, "c": 400}
    nxt = {"a": 0.0, "b": 1.0, "c": 2.0}
    proactive = policy().decide(batch=["a"], kv_bytes=sizes, on_host=set(), next_scheduled=nxt)
    reactive = policy(proactive=False).decide(
        batch=["a"], kv_bytes=sizes, on_host=set(), next_scheduled=nxt
    )
    assert proactive.swap_out == ("c",)  # 950 > 900 keep limit
    assert reactive.swap_out == ()  # 950 <= 1000 budget
    grown = {**sizes, "a": 300}
    reactive = policy(proactive=False).decide(
        batch=["a"], kv_bytes=grown, on_host=set(), next_scheduled=nxt
    )
    assert reactive.swap_out == ("c",)


def test_hysteresis_keeps_a_resident_near_tie_in_place() -> None:
    sizes = {"a": 400, "r": 400, "h": 400}
    nxt = {"a": 0.0, "r": 5.0, "h": 4.9}
    args = dict(batch=["a"], kv_bytes=sizes, on_host={"h"}, next_scheduled=nxt)
    eager = policy().decide(**args)  # type: ignore[arg-type]
    assert (eager.swap_out, eager.prefetch) == (("r",), ("h",))
    sticky = policy(hysteresis_s=0.5).decide(**args)  # type: ignore[arg-type]
    assert (sticky.swap_out, sticky.prefetch) == ((), ())


def test_unknown_batch_member_is_an_error() -> None:
    with pytest.raises(ValueError):
        policy().decide(batch=["nope"], kv_bytes={}, on_host=set(), next_scheduled={})


def test_attach_residency_fills_the_scheduler_output() -> None:
    out = SchedulerOutput((ScheduledWork("a", 1),), preempted=("z",))
    decision = ResidencyDecision(swap_out=("z",), swap_in=("a",), prefetch=("y",))
    attached = attach_residency(out, decision)
    assert attached.preempted == ("z",)
    assert (attached.swap_out, attached.swap_in, attached.prefetch) == (("z",), ("a",), ("y",))
    assert SchedulerOutput.empty().swap_out == ()


Instance = tuple[ResidencyConfig, list[str], dict[str, int], set[str], dict[str, float]]


@st.composite
def instances(draw: st.DrawFn) -> Instance:
    n = draw(st.integers(1, 12))
    rids = [f"r{i}" for i in range(n)]
    sizes = {rid: draw(st.integers(0, 400)) for rid in rids}
    batch = draw(st.lists(st.sampled_from(rids), unique=True, max_size=n))
    on_host = {rid for rid in rids if sizes[rid] > 0 and draw(st.booleans())}
    nxt = {rid: 0.0 if rid in batch else draw(st.floats(0.0, 50.0)) for rid in rids}
    config = ResidencyConfig(
        device_budget_bytes=draw(st.integers(0, 2000)),
        reserve_fraction=draw(st.sampled_from([0.0, 0.1, 0.3])),
        mode=draw(st.sampled_from(["swap", "recompute"])),
        proactive=draw(st.booleans()),
        hysteresis_s=draw(st.sampled_from([0.0, 1.0])),
    )
    return config, batch, sizes, on_host, nxt


@settings(max_examples=120, deadline=None)
@given(instances())
def test_decision_invariants(inst: Instance) -> None:
    config, batch, sizes, on_host, nxt = inst
    got = KVResidencyPolicy(config).decide(batch, sizes, on_host, nxt)
    resident_before = set(sizes) - on_host
    leaving = set(got.swap_out) | set(got.drop)
    arriving = set(got.swap_in) | set(got.prefetch)
    after = (resident_before - leaving) | arriving
    running = [rid for rid in batch if rid not in got.deferred]
    assert leaving <= resident_before and arriving <= on_host
    assert set(running) <= after  # the batch runs on device
    assert got.device_bytes == sum(sizes[rid] for rid in after)
    assert got.device_bytes <= config.device_budget_bytes
    assert list(got.deferred) == batch[len(running):]  # deferred from the tail
    if config.mode == "recompute":
        assert got.swap_out == () and got.prefetch == ()
    else:
        assert got.drop == ()
    times = [nxt[rid] for rid in (got.swap_out or got.drop)]
    assert times == sorted(times, reverse=True)
    assert [nxt[rid] for rid in got.prefetch] == sorted(nxt[rid] for rid in got.prefetch)
    non_batch_kept = after - set(running)
    if sum(sizes[rid] for rid in non_batch_kept) > 0:  # others are kept only under the keep limit
        assert got.device_bytes <= config.keep_limit_bytes
