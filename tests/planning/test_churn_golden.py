"""The churn path's exact outputs on seeded random reconfigurations stay what they were.

The mapper and the migration planner were restructured for speed (instance-level scores, per-call
caches of shared slice tuples). These cases pin their outputs bit for bit: the placement, the
replica inheritance, the reused bytes, and a digest of the whole migration plan (every transfer in
order, every release, the readiness, the peak bytes and the time estimates, floats by ``repr``).
The expected values in ``churn_golden.json`` were generated with the implementation *before* the
speed-up; regenerate them (``python -m tests.planning.test_churn_golden``) only for a change that
is meant to alter plans.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from elastic_llm.model.spec import DESCRIBED_MODELS, ModelSpec
from elastic_llm.planning.config import ParallelConfig, Placement, Worker
from elastic_llm.planning.errors import MemoryBoundError
from elastic_llm.planning.mapper import DeviceMapper, MappingResult
from elastic_llm.planning.migration import MigrationPlan, MigrationPlanner

from .helpers import tiny_model

GOLDEN = Path(__file__).with_name("churn_golden.json")
T4_BYTES = 16 * 2**30
TINY_LOW, TINY_HIGH = 40_000, 80_000  #: tiny model (124 kB in all): bounds that force reordering

#: (name, model, devices per instance or None for mixed sizes, instances, (P, M) shapes, range of
#: device memory, intra-instance bandwidth, cached tokens per interrupted batch, seeds)
CASES: list[tuple[str, ModelSpec, int | None, int, list[tuple[int, int]], tuple[int, int],
                  float | None, int, range]] = [
    ("gpt20b-4gpu", DESCRIBED_MODELS["gpt-20b"], 4, 24, [(3, 4), (4, 4), (2, 4), (6, 2)],
     (T4_BYTES, T4_BYTES), 8e9, 2400, range(4)),
    ("gpt20b-1gpu", DESCRIBED_MODELS["gpt-20b"], 1, 40, [(3, 4), (4, 2), (8, 2), (12, 1)],
     (T4_BYTES, T4_BYTES), None, 2400, range(3)),
    ("gpt20b-mixed", DESCRIBED_MODELS["gpt-20b"], None, 12, [(3, 4), (4, 2), (12, 1)],
     (T4_BYTES, T4_BYTES), 8e9, 2400, range(2)),
    ("tiny-2gpu-tight", tiny_model(), 2, 6, [(2, 1), (2, 2), (4, 1), (4, 2)],
     (TINY_LOW, TINY_HIGH), 1e7, 30, range(8)),
    ("gpt20b-8gpu", DESCRIBED_MODELS["gpt-20b"], 8, 6, [(3, 4), (2, 8), (6, 4)],
     (T4_BYTES, T4_BYTES), 8e9, 2400, range(2)),
    ("gpt20b-4gpu-huge-kv", DESCRIBED_MODELS["gpt-20b"], 4, 12, [(3, 4), (4, 4)],
     (1 << 62, 1 << 62), 8e9, 500_000_000_003, range(3)),
]


def _instances(rng: random.Random, prefix: str, count: int, group: int | None,
               memory: tuple[int, int]) -> list[list[Worker]]:
    """``count`` instances of ``group`` devices (random 1, 2 or 4 when ``group`` is None), each
    device with a random memory bound in the range ``memory``."""
    out = []
    for i in range(count):
        size = group or rng.choice((1, 2, 4))
        out.append([Worker(f"{prefix}{i}.g{g}", f"{prefix}{i}", memory_bytes=rng.randint(*memory),
                           bandwidth=rng.choice((1e9, 6.25e9))) for g in range(size)])
    return out


def _config(rng: random.Random, shapes: list[tuple[int, int]], devices: int) -> ParallelConfig:
    """A random configuration of one of ``shapes`` with as many replicas as fit on ``devices``."""
    fitting = [(p, m) for p, m in shapes if p * m <= devices]
    p, m = rng.choice(fitting)
    return ParallelConfig(rng.randint(1, devices // (p * m)), p, m, 4)


def run_case(name: str, model: ModelSpec, group: int | None, count: int,
             shapes: list[tuple[int, int]], memory: tuple[int, int], intra: float | None,
             tokens: int, seed: int) -> dict[str, Any]:
    """One churn event: old placement on shuffled workers, instances leaving (as senders), lost
    and joining, then mapper and planner; returns the fingerprint of their outputs."""
    rng = random.Random(f"{name}/{seed}")
    fleet = _instances(rng, "i", count, group, memory)
    old_workers = [w for inst in fleet for w in inst]
    old_config = _config(rng, shapes, len(old_workers))
    chosen = rng.sample(old_workers, old_config.num_positions)
    old = Placement(old_config, tuple(w.name for w in chosen))
    rng.shuffle(fleet)
    leaving = fleet[:max(1, count // 8)]
    lost = fleet[len(leaving):len(leaving) + rng.randint(0, 1)]
    staying = fleet[len(leaving) + len(lost):]
    joining = _instances(rng, "n", rng.randint(0, max(1, count // 8)), group, memory)
    workers = [w for inst in staying + joining for w in inst]
    senders = [w for inst in leaving for w in inst]
    new_config = _config(rng, shapes, len(workers))
    kv = {r: tokens + rng.randint(0, 50) for r in range(old_config.D) if rng.random() < 0.8}
    progress = {r: float(rng.randint(0, 100)) for r in range(old_config.D)}
    mapping = DeviceMapper(model).map(workers, old, new_config, kv, progress)
    planner = MigrationPlanner(model, intra_instance_bandwidth=intra)
    plan = _plan_or_error(planner, mapping.placement, workers + senders, old, kv,
                          mapping.inherits)
    cold = _plan_or_error(planner, mapping.placement, workers)  # from the checkpoint
    # a random placement moves far more (and, under tight bounds, must reorder)
    shuffled = Placement(new_config, tuple(w.name for w in rng.sample(workers, len(
        mapping.placement.workers))))
    moved = _plan_or_error(planner, shuffled, workers + senders, old, kv, mapping.inherits)
    return {"mapping": _mapping_fingerprint(mapping), "plan": _plan_fingerprint(plan),
            "cold": _plan_fingerprint(cold), "shuffled": _plan_fingerprint(moved)}


def _plan_or_error(planner: MigrationPlanner, *args: Any) -> MigrationPlan | str:
    """``planner.plan(*args)``, or the name of the memory-bound error it raises."""
    try:
        return planner.plan(*args)
    except MemoryBoundError:
        return "MemoryBoundError"


def _mapping_fingerprint(mapping: MappingResult) -> dict[str, Any]:
    """Everything the mapper decided, as JSON."""
    return {"workers": list(mapping.placement.workers), "inherits": list(mapping.inherits),
            "weight": mapping.reused_weight_bytes, "kv": mapping.reused_kv_bytes,
            "idle": list(mapping.idle)}


def _plan_fingerprint(plan: MigrationPlan | str) -> dict[str, Any]:
    """A few readable counts and the SHA-256 of the whole plan's ``repr`` (or the error)."""
    if isinstance(plan, str):
        return {"error": plan}
    text = repr((plan.transfers, plan.releases, plan.readiness, sorted(plan.peak_bytes.items()),
                 plan.estimated_seconds, plan.weight_seconds, plan.kv_seconds,
                 plan.kv_total_bytes, plan.lost_batches))
    return {"transfers": len(plan.transfers), "releases": len(plan.releases),
            "seconds": repr(plan.estimated_seconds),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _all_cases() -> list[tuple[str, int]]:
    """(case name, seed) of every recorded case."""
    return [(case[0], seed) for case in CASES for seed in case[-1]]


def _compute(name: str, seed: int) -> dict[str, Any]:
    """The fingerprint of case ``name`` with ``seed``."""
    case = next(c for c in CASES if c[0] == name)
    return run_case(*case[:-1], seed=seed)


@pytest.mark.parametrize(("name", "seed"), _all_cases())
def test_churn_outputs_match_the_recorded_ones(name: str, seed: int) -> None:
    expected = json.loads(GOLDEN.read_text())[f"{name}/{seed}"]
    assert _compute(name, seed) == expected


if __name__ == "__main__":  # regenerate (only for an intended change of plans)
    GOLDEN.write_text(json.dumps({f"{n}/{s}": _compute(n, s) for n, s in _all_cases()},
                                 indent=1) + "\n")
