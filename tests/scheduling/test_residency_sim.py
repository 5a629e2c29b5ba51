"""MLFQ + KV residency driven by a fake engine that holds KV on 'device' or 'host'.

Checks, every iteration: device KV never exceeds the budget (after evictions, after swap-ins and
after the batch ran); every scheduled request's KV is on device (so each swapped-out request was
swapped back in before it was scheduled); the KV comes back intact (token positions 0..n-1, none
lost or duplicated); every request finishes with all its tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from elastic_llm.scheduling import (
    BatchLimits,
    IterationOutcome,
    KVResidencyPolicy,
    LinearPrefillPredictor,
    MLFQConfig,
    ResidencyConfig,
    SchedulerOutput,
    SkipJoinMLFQ,
    make_workload,
    plan_iteration,
)

BYTES_PER_TOKEN = 8
BUDGET = 400 * BYTES_PER_TOKEN


@dataclass
class SimRequest:
    prompt: int
    output: int
    to_compute: int
    generated: int = 0
    device_kv: list[int] | None = field(default_factory=list)  # token positions, None = on host
    host_kv: list[int] | None = None
    finished: bool = False


class FakeKVEngine:
    """Executes scheduler outputs: KV moves first, then the batch."""

    def __init__(self, sched: SkipJoinMLFQ) -> None:
        self.sched = sched
        self.reqs: dict[str, SimRequest] = {}
        self.moves: Counter[str] = Counter()

    def active(self) -> dict[str, SimRequest]:
        return {rid: r for rid, r in self.reqs.items() if not r.finished}

    def device_bytes(self) -> int:
        held = (len(r.device_kv) for r in self.active().values() if r.device_kv is not None)
        return sum(held) * BYTES_PER_TOKEN

    def kv_tokens(self) -> dict[str, int]:
        tokens: dict[str, int] = {}
        for rid, req in self.active().items():
            kv = req.host_kv if req.device_kv is None else req.device_kv
            tokens[rid] = len(kv or [])
        return tokens

    def on_host(self) -> set[str]:
        return {rid for rid, r in self.active().items() if r.device_kv is None}

    def move(self, out: SchedulerOutput) -> None:
        for rid in out.swap_out:
            req = self.reqs[rid]
            assert req.device_kv, f"swap_out of {rid} without device KV"
            req.host_kv, req.device_kv = list(req.device_kv), None
            self.moves["swap_out"] += 1
        for rid in out.drop:
            req = self.reqs[rid]
            assert req.device_kv, f"drop of {rid} without device KV"
            req.device_kv = []
            req.to_compute = req.prompt + req.generated if req.generated else req.prompt
            self.sched.mark_kv_dropped(rid, req.to_compute)
            self.moves["drop"] += 1
        assert self.device_bytes() <= BUDGET
        for rid in (*out.swap_in, *out.prefetch):
            req = self.reqs[rid]
            assert req.device_kv is None and req.host_kv is not None, f"{rid} not on host"
            req.device_kv, req.host_kv = list(req.host_kv), None
            self.moves["swap_in"] += 1
        assert self.device_bytes() <= BUDGET

    def run_batch(self, out: SchedulerOutput, now: float, duration: float) -> IterationOutcome:
        computed: dict[str, int] = {}
        sampled: list[str] = []
        for work in out.scheduled:
            req = self.reqs[work.request_id]
            kv = req.device_kv
            assert kv is not None, f"{work.request_id} scheduled while its KV is on host"
            assert kv == list(range(len(kv))), "KV not intact"
            kv.extend(range(len(kv), len(kv) + work.num_tokens))
            computed[work.request_id] = work.num_tokens
            if req.to_compute > 0:
                req.to_compute -= work.num_tokens
                assert req.to_compute >= 0
                if req.to_compute:
                    continue
            else:
                assert work.num_tokens == 1
            req.generated += 1
            sampled.append(work.request_id)
        assert self.device_bytes() <= BUDGET
        return IterationOutcome(now + duration, duration, computed, tuple(sampled))


def simulate(residency: ResidencyConfig) -> FakeKVEngine:
    cfg = MLFQConfig(base_quantum_s=0.01, starvation_alpha_s=0.5)
    sched = SkipJoinMLFQ(cfg, LinearPrefillPredictor(0.004, 0.00005))
    policy = KVResidencyPolicy(residency)
    engine = FakeKVEngine(sched)
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=128)
    items = make_workload(40, 60.0, "alpaca", seed=3, max_prompt_tokens=64, max_output_tokens=24)
    now, nxt = 0.0, 0
    for _ in range(20_000):
        while nxt < len(items) and items[nxt].arrival_s <= now:
            item, rid = items[nxt], f"r{nxt}"
            prompt, output = item.prompt_tokens, item.output_tokens
            engine.reqs[rid] = SimRequest(prompt, output, to_compute=prompt)
            sched.add_request(rid, item.prompt_tokens, now)
            nxt += 1
        out = plan_iteration(
            sched, policy, now=now, limits=limits, kv_tokens=engine.kv_tokens(),
            kv_bytes_per_token=BYTES_PER_TOKEN, on_host=engine.on_host(),
        )
        engine.move(out)
        if not out.scheduled:
            assert not engine.active(), "requests held but nothing scheduled"
            if nxt == len(items):
                return engine
            now = items[nxt].arrival_s
            continue
        duration = 0.004 + 0.00005 * out.num_tokens
        sched.update(engine.run_batch(out, now, duration))
        now += duration
        for work in out.scheduled:
            req = engine.reqs[work.request_id]
            if req.generated == req.output:
                req.finished, req.device_kv, req.host_kv = True, None, None
                sched.remove_request(work.request_id)
    raise AssertionError("simulation did not finish")


@pytest.mark.parametrize("proactive", [True, False])
def test_swap_mode_keeps_device_kv_within_budget(proactive: bool) -> None:
    engine = simulate(ResidencyConfig(BUDGET, reserve_fraction=0.2, proactive=proactive))
    assert all(r.finished and r.generated == r.output for r in engine.reqs.values())
    assert engine.moves["swap_out"] > 0 and engine.moves["swap_in"] > 0
    assert engine.moves["drop"] == 0


def test_recompute_mode_keeps_device_kv_within_budget() -> None:
    engine = simulate(ResidencyConfig(BUDGET, mode="recompute", proactive=False))
    assert all(r.finished and r.generated == r.output for r in engine.reqs.values())
    assert engine.moves["drop"] > 0
    assert engine.moves["swap_out"] == engine.moves["swap_in"] == 0
