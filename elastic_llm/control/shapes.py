"""Which (D, P, M) sharded replicas run: the planning core's optimizer over the workers at hand.

`ShapePlanner` binds a `ConfigOptimizer` to the served model's `ModelSpec`, an instance profile
(a measured one from ``elastic-llm profile``, or an analytic CPU roofline) and the replicas' batch
size, and answers "on these N workers, each holding at most this many bytes, at this arrival rate,
running (P, M) now, what should run?". The memory budget is what forces sharding: a model whose
weights and KV do not fit one worker gets P * M > 1 from the optimizer.

Pure policy: no torch, no dask, no clock (the controller passes everything in).
"""

from __future__ import annotations

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import CostModel
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.optimizer import ConfigOptimizer, SearchSpace, SwitchCost
from elastic_llm.planning.profiles import AnalyticProfile, DeviceSpec, InstanceProfile, Link

#: A 2-core CPU worker as a roofline (our machine's order of magnitude, for models never profiled).
CPU_WORKER = DeviceSpec("cpu-worker", fp32_flops=1.0e11, fp16_flops=1.0e11, memory_bandwidth=2.0e10,
                        memory_bytes=8 * 2**30, compute_efficiency=0.5, memory_efficiency=0.5,
                        usable_memory_fraction=1.0)
#: Loopback TCP between worker processes (gloo).
LOOPBACK = Link(bandwidth=2.0e9, latency=2e-4)


def with_memory_budget(profile: InstanceProfile, memory_bytes: int) -> InstanceProfile:
    """`profile` with each device holding at most `memory_bytes` of weights + KV."""
    if isinstance(profile, MeasuredProfile):
        return MeasuredProfile({**profile.to_dict(), "device_memory_bytes": int(memory_bytes)})
    if isinstance(profile, AnalyticProfile):
        device = DeviceSpec(profile.device.name, profile.device.fp32_flops, profile.device.fp16_flops,
                            profile.device.memory_bandwidth, int(memory_bytes),
                            profile.device.compute_efficiency, profile.device.memory_efficiency, 1.0)
        return AnalyticProfile(profile.name, device, profile.devices_per_instance, profile.intra,
                               profile.network, profile.max_tensor)
    raise TypeError(f"cannot set the memory budget of a {type(profile).__name__}")


def cpu_profile(memory_bytes: int, max_tensor: int = 4) -> AnalyticProfile:
    """An analytic profile of one-process CPU workers holding at most `memory_bytes` each."""
    profile = AnalyticProfile("cpu worker", CPU_WORKER, 1, LOOPBACK, LOOPBACK, max_tensor)
    return with_memory_budget(profile, memory_bytes)  # type: ignore[return-value]


class ShapePlanner:
    """Chooses replica shapes with the planning core's `ConfigOptimizer`.

    Args:
        spec: the served model.
        profile: timings of one worker (its memory budget is replaced per call).
        batch_size: the replicas' batch size B.
        workload: prompt and output lengths to plan for.
        switch_seconds: expected pause of a shape change (favours keeping the running shape).
        horizon_s: expected time until the next reconfiguration.
    """

    def __init__(self, spec: ModelSpec, profile: InstanceProfile, batch_size: int,
                 workload: Workload = Workload(input_len=128, output_len=64),
                 switch_seconds: float = 2.0, horizon_s: float = 120.0) -> None:
        self.spec = spec
        self.profile = profile
        self.batch_size = batch_size
        self.workload = workload
        self.switch_seconds = switch_seconds
        self.horizon_s = horizon_s
        self._optimizers: dict[int, ConfigOptimizer] = {}

    def choose(self, workers: int, memory_bytes: int, arrival_rate: float = 0.0,
               current: tuple[int, int] | None = None) -> ParallelConfig:
        """The configuration (D replicas of (P, M), batch B) for `workers` workers of
        `memory_bytes` each.

        Raises `NoFeasibleConfigError` when the model fits no shape on them.
        """
        optimizer = self._optimizer(memory_bytes)
        switch = None
        if current is not None:
            running = ParallelConfig(1, current[0], current[1], self.batch_size)
            switch = SwitchCost(running, self.switch_seconds, self.horizon_s)
        choice = optimizer.choose(workers, arrival_rate, switch)
        return choice.config

    def fits(self, shape: tuple[int, int], memory_bytes: int) -> bool:
        """Whether one replica of `shape` fits workers of `memory_bytes`."""
        cost_model = self._optimizer(memory_bytes).cost_model
        return cost_model.fits(ParallelConfig(1, shape[0], shape[1], self.batch_size))

    def optimizer(self, memory_bytes: int) -> ConfigOptimizer:
        """The optimizer for workers of `memory_bytes` each (made once per budget)."""
        return self._optimizer(memory_bytes)

    def _optimizer(self, memory_bytes: int) -> ConfigOptimizer:
        if memory_bytes not in self._optimizers:
            profile = with_memory_budget(self.profile, memory_bytes)
            space = SearchSpace(batch_sizes=(self.batch_size,), micro_batches=(1,))
            self._optimizers[memory_bytes] = ConfigOptimizer(CostModel(self.spec, profile, self.workload), space)
        return self._optimizers[memory_bytes]


def load_changed(planned: float | None, current: float, factor: float = 2.0,
                 floor: float = 1.0 / 60) -> bool:
    """Whether the arrival rate moved far enough from the one the running shapes were planned
    for to plan again: by `factor` or more either way. Rates under `floor` (requests/s) count
    as `floor`, so that a trickle of requests does not re-plan again and again."""
    if planned is None:
        return False
    low, high = sorted((max(planned, floor), max(current, floor)))
    return high >= factor * low


def fit_shape(current: tuple[int, int], workers: int) -> tuple[int, int]:
    """Without a planner (an explicit `ReplicaOptions.parallel`): the (P, M) a replica that lost
    workers switches to on `workers` workers: the most positions that fit, preferring the current
    tensor degree M, then the current P, then fewer tensor ranks."""
    if workers < 1:
        raise ValueError("a replica needs at least one worker")
    shapes = [(p, m) for p in range(1, workers + 1) for m in range(1, workers // p + 1)]
    return max(shapes, key=lambda s: (s[0] * s[1], s[1] == current[1], s[0] == current[0], -s[1]))
