"""Cost model: latency, throughput and memory of a `ParallelConfig`, as a structured breakdown.

One narrow interface (`CostModel.estimate`) over either kind of `InstanceProfile`. The pipeline
formulas are SpotServe's, with ``f = ceil(L / P)`` layers on the busiest stage, ``m1`` / ``m2``
prefill / decode micro-batches of ``B / m`` requests each:

* prefill     = layer(B/m1) * f * (P + m1 - 1) + hop(B/m1) * (P - 1) + head(B/m1)
* decode step = layer(B/m2) * f * (P + m2 - 1) + hop(B/m2) * (P - 1) + head(B/m2)
* latency     = (prefill + S_out * decode step) * overhead   (overhead 1.1, SpotServe's factor)
* throughput  = D * B / latency   (requests per second)

Two deliberate differences from the SpotServe artifact: (1) its prefill formula divides the
pipeline term by m1 once more, which rewards ever more micro-batches beyond what a pipeline can
deliver; we keep the physical ``(P + m1 - 1)`` micro-batch slots. (2) The LM head runs every decode
step on the last stage (the artifact adds two embedding times per request).

Memory per device = its weight slices (`SliceAlgebra`) + KV for B requests of
``input_len + output_len`` tokens over its layers and KV heads; a config fits when the fullest
device stays within ``profile.device_memory_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.errors import PlanningError
from elastic_llm.planning.profiles import InstanceProfile, OpTime, Phase
from elastic_llm.planning.slices import SliceAlgebra

#: SpotServe's final fudge factor on request latency.
SPOTSERVE_OVERHEAD = 1.1


@dataclass(frozen=True)
class PhaseBreakdown:
    """Seconds of one prefill or one decode step of the whole batch, by cause."""

    compute: float  #: device compute and memory traffic (layers and LM head)
    tp_comm: float  #: tensor-parallel all-reduces
    pp_comm: float  #: pipeline stage-to-stage hops

    @property
    def total(self) -> float:
        """Seconds of the phase."""
        return self.compute + self.tp_comm + self.pp_comm


@dataclass(frozen=True)
class CostBreakdown:
    """Everything the cost model predicts for one configuration."""

    config: ParallelConfig  #: the configuration estimated
    prefill: PhaseBreakdown  #: one prefill of a full batch
    decode_step: PhaseBreakdown  #: one decode step of a full batch (one token per request)
    latency: float  #: seconds from start of prefill to last token of a request (overhead applied)
    throughput: float  #: requests per second of all D replicas together
    weight_bytes: int  #: weight bytes of the fullest device
    kv_bytes: int  #: KV-cache bytes of the fullest device for B full-length requests
    memory_bytes: int  #: weights + KV of the fullest device
    fits: bool  #: memory_bytes <= the profile's per-device memory


class CostModel:
    """Predicts `CostBreakdown` for configs of ``model`` on ``profile`` under ``workload``.

    Layer times are cached per (phase, tensor degree, micro-batch), so sweeping thousands of
    configurations (the optimizer) costs little more than the arithmetic.
    """

    def __init__(self, model: ModelSpec, profile: InstanceProfile, workload: Workload,
                 overhead: float = SPOTSERVE_OVERHEAD) -> None:
        """Bind the model to a model, an instance profile and a workload."""
        self.model = model
        self.profile = profile
        self.workload = workload
        self.overhead = overhead
        self.algebra = SliceAlgebra(model)
        self._ops: dict[tuple[str, Phase, int, int], OpTime | float] = {}
        self._memory: dict[tuple[int, int, int], tuple[int, int]] = {}

    def _op(self, kind: str, phase: Phase, tensor: int, micro_batch: int) -> OpTime:
        key = (kind, phase, tensor, micro_batch)
        if key not in self._ops:
            fn = self.profile.layer_time if kind == "layer" else self.profile.head_time
            self._ops[key] = fn(self.model, phase, tensor, micro_batch, self.workload)
        value = self._ops[key]
        assert isinstance(value, OpTime)
        return value

    def _hop(self, phase: Phase, micro_batch: int) -> float:
        key = ("hop", phase, 0, micro_batch)
        if key not in self._ops:
            self._ops[key] = self.profile.stage_hop_time(self.model, phase, micro_batch,
                                                         self.workload)
        value = self._ops[key]
        assert isinstance(value, float)
        return value

    def phase(self, config: ParallelConfig, phase: Phase) -> PhaseBreakdown:
        """Seconds of one prefill (``Phase.PREFILL``) or one decode step of the full batch."""
        micro = (config.prefill_micro_batches if phase is Phase.PREFILL
                 else config.decode_micro_batches)
        size = config.B // micro
        slots = config.max_stage_layers(self.model.num_layers) * (config.P + micro - 1)
        layer = self._op("layer", phase, config.M, size)
        head = self._op("head", phase, config.M, size)
        return PhaseBreakdown(
            compute=layer.compute * slots + head.compute,
            tp_comm=layer.tp_comm * slots + head.tp_comm,
            pp_comm=self._hop(phase, size) * (config.P - 1),
        )

    def memory(self, config: ParallelConfig) -> tuple[int, int]:
        """(weight bytes, KV bytes) of the device whose sum is largest under ``config``."""
        key = (config.P, config.M, config.B)
        if key not in self._memory:
            weights = np.diagonal(self.algebra.weight_overlap(config, config))
            kv_token = np.array([self.algebra.kv_bytes_per_token(config, s, r)
                                 for s in range(config.P) for r in range(config.M)])
            kv = kv_token * config.B * self.workload.context_len
            worst = int(np.argmax(weights + kv))
            self._memory[key] = (int(weights[worst]), int(kv[worst]))
        return self._memory[key]

    def fits(self, config: ParallelConfig) -> bool:
        """True when the fullest device of ``config`` stays within the profile's memory."""
        return sum(self.memory(config)) <= self.profile.device_memory_bytes

    def estimate(self, config: ParallelConfig) -> CostBreakdown:
        """The full breakdown for ``config`` (also for configs that do not fit: see ``fits``)."""
        if config.P > self.model.num_layers:
            raise PlanningError(f"P={config.P} exceeds the model's {self.model.num_layers} layers")
        prefill = self.phase(config, Phase.PREFILL)
        decode = self.phase(config, Phase.DECODE)
        latency = (prefill.total + self.workload.output_len * decode.total) * self.overhead
        weights, kv = self.memory(config)
        return CostBreakdown(
            config=config,
            prefill=prefill,
            decode_step=decode,
            latency=latency,
            throughput=config.D * config.B / latency,
            weight_bytes=weights,
            kv_bytes=kv,
            memory_bytes=weights + kv,
            fits=weights + kv <= self.profile.device_memory_bytes,
        )
