"""Which (P, M) sharded replicas get: the planning core's optimizer, or the fixed shape.

`ShapeChoice` keeps what the choice depends on across calls: the shape planner (made once the
model's spec is known), the baselines' first shape (kept for good), and the arrival rate the
fleet's shapes were planned for (so a sustained load change can plan again). Pure policy.
"""

from __future__ import annotations

import bisect

from elastic_llm.control.shapes import ShapePlanner, cpu_profile, fit_shape
from elastic_llm.planning.config import Workload
from elastic_llm.planning.errors import NoFeasibleConfigError
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import InstanceProfile


class ShapeChoice:
    """Replica shapes for a number of workers.

    Args:
        parallel: the fixed (P, M), or None: the optimizer chooses.
        batch_size: the replicas' batch size.
        adaptive: re-choose as workers and load change (else the first choice is kept).
        profile: timings the optimizer plans with (None: a CPU roofline at the memory budget).
        workload: (prompt, output) tokens the optimizer plans for.
    """

    def __init__(self, parallel: tuple[int, int] | None, batch_size: int, adaptive: bool,
                 profile: InstanceProfile | None = None, workload: tuple[int, int] = (128, 64)) -> None:
        self.parallel = parallel
        self.batch_size = batch_size
        self.adaptive = adaptive
        self.profile = profile
        self.workload = Workload(input_len=workload[0], output_len=workload[1])  #: what shapes are planned for
        self.spec: object | None = None  #: the model's `ModelSpec`, once described
        self.planned_rate: float | None = None  #: arrival rate (1/s) the fleet was planned for
        self.notes: list[str] = []  #: why a given profile was not used
        self._planner: ShapePlanner | None = None
        self._fixed: tuple[int, int] | None = None
        self._needed: dict[tuple[float, int, int], tuple[int, tuple[int, int]] | None] = {}

    @property
    def needs_spec(self) -> bool:
        """Whether choosing a shape waits for the model's spec."""
        return self.parallel is None and self.spec is None

    def shape_for(self, workers: int, memory_bytes: int, rate: float,
                  current: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """The (P, M) for one replica on `workers` workers (None: the model fits no shape there).

        `current`: the shape of the replica being reshaped (it favours keeping it); None: a plan
        for the whole fleet, whose arrival rate is remembered."""
        if self.parallel is not None:
            return self.parallel
        if self._fixed is not None:  # kept for good: it fits these workers or nothing does
            return self._fixed if self._fixed[0] * self._fixed[1] <= workers else None
        if workers < 1 or self.spec is None:
            return None
        try:
            decision = self._planner_for(memory_bytes).choose(workers, memory_bytes, rate, current)
        except NoFeasibleConfigError:
            return None
        if not self.adaptive:
            self._fixed = decision.shape
        if current is None:
            self.planned_rate = rate
        return decision.shape

    def shape_after_loss(self, current: tuple[int, int], workers: int, memory_bytes: int, rate: float,
                         favour_current: bool = True) -> tuple[int, int] | None:
        """The shape of a replica (or its successor) left with `workers` workers: the
        optimizer's (None: no shape fits), else, for a fixed shape, the most positions the
        workers hold (`fit_shape`)."""
        if workers < 1:
            return None
        if self.parallel is None:
            return self.shape_for(workers, memory_bytes, rate, current if favour_current else None)
        return fit_shape(current, workers)

    def workers_needed(self, rate: float, memory_bytes: int, most: int) -> tuple[int, tuple[int, int]] | None:
        """The fewest workers (at most `most`) on which the optimizer's configuration meets `rate`,
        and the replica shape it runs there (None: the spec is not known yet, or no count up to
        `most` meets the rate, or `memory_bytes` < 1: no budget known). Throughput never falls as
        workers are added (the optimizer's candidate set only grows), so the count is found by
        bisection; results are cached."""
        if self.spec is None or most < 1 or memory_bytes < 1:
            return None
        key = (round(rate, 6), memory_bytes, most)
        if key not in self._needed:
            optimizer = self._planner_for(memory_bytes).optimizer(memory_bytes)

            def meets(workers: int) -> bool:
                try:
                    return optimizer.choose(workers, rate).meets_rate
                except NoFeasibleConfigError:
                    return False

            fewest = bisect.bisect_left(range(1, most + 1), True, key=meets) + 1
            self._needed[key] = None if fewest > most else (fewest, optimizer.choose(fewest, rate).config.shape)
        return self._needed[key]

    def _planner_for(self, memory_bytes: int) -> ShapePlanner:
        if self._planner is None:
            profile = self.profile
            if isinstance(profile, MeasuredProfile) and profile.model_name not in (None, self.spec.name):  # type: ignore[attr-defined]
                self.notes.append(f"profile measured {profile.model_name}, not {self.spec.name}: "  # type: ignore[attr-defined]
                                  "planning with a CPU roofline instead")
                profile = None
            self._planner = ShapePlanner(self.spec, profile or cpu_profile(memory_bytes),  # type: ignore[arg-type]
                                         self.batch_size, self.workload)
        return self._planner
