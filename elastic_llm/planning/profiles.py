"""Instance profiles: how long one layer takes, behind the narrow interface the cost model uses.

Two sources implement `InstanceProfile`:

* `AnalyticProfile` (this module) for hardware we do not have (T4, A10G, A100, H100): a roofline
  (FLOPs at an effective fraction of peak vs. bytes at an effective fraction of memory bandwidth)
  plus ring all-reduce and stage-hop costs from link bandwidth and latency.
* `MeasuredProfile` (``measured.py``) loaded from the JSON the ``elastic-llm profile`` command
  writes after timing our own engine.

Calibration (see docs/planning.md): the T4's efficiencies and link figures are fitted so that the
analytic profile reproduces SpotServe's published per-layer latencies for their 6.7B model at
M=4, batch 4, prompt 512 (prefill 61.6 ms/layer, decode 1.02 ms/layer, FasterTransformer fp32 on
g4dn.12xlarge) and their stage-hop times; the usable-memory fraction is chosen so that the memory
floors come out as theirs (at least 4 / 12 / 16 T4s for 6.7B / 20B / 30B). The other devices reuse
the T4's efficiencies: an assumption, not a measurement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import Workload


class Phase(str, Enum):
    """The two kinds of iteration a replica runs."""

    PREFILL = "prefill"  #: the whole prompt of every request in the micro-batch
    DECODE = "decode"  #: one new token per request in the micro-batch


@dataclass(frozen=True)
class OpTime:
    """Seconds one operation takes, split by where they go."""

    compute: float = 0.0  #: seconds of arithmetic and memory traffic on the device
    tp_comm: float = 0.0  #: seconds of tensor-parallel all-reduce

    @property
    def total(self) -> float:
        """compute + tp_comm."""
        return self.compute + self.tp_comm

    def scaled(self, factor: float) -> OpTime:
        """Both parts multiplied by ``factor``."""
        return OpTime(self.compute * factor, self.tp_comm * factor)


class InstanceProfile(ABC):
    """What the cost model needs to know about one kind of instance.

    All times are seconds for one micro-batch of ``micro_batch`` requests of ``workload``'s shape,
    with the layer sharded over ``tensor`` ranks. Implementations must be pure and deterministic.
    """

    name: str  #: e.g. "g4dn.12xlarge (4 x T4)"
    devices_per_instance: int  #: GPUs (workers) per instance
    device_memory_bytes: int  #: bytes of weights + KV one device may hold
    network_bandwidth: float  #: bytes/s one device's share of the instance's network link

    @abstractmethod
    def tensor_degrees(self) -> tuple[int, ...]:
        """Tensor-parallel degrees this profile can predict."""

    @abstractmethod
    def layer_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                   workload: Workload) -> OpTime:
        """One transformer layer (its two all-reduces included) for one micro-batch."""

    @abstractmethod
    def head_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                  workload: Workload) -> OpTime:
        """Embedding lookup + LM head + sampling for one micro-batch (last positions only)."""

    @abstractmethod
    def stage_hop_time(self, model: ModelSpec, phase: Phase, micro_batch: int,
                       workload: Workload) -> float:
        """Sending one micro-batch's hidden states from one pipeline stage to the next."""


@dataclass(frozen=True)
class DeviceSpec:
    """Published hardware figures of one accelerator plus calibrated efficiencies."""

    name: str  #: e.g. "T4"
    fp32_flops: float  #: peak dense fp32 FLOP/s
    fp16_flops: float  #: peak dense fp16/bf16 FLOP/s (tensor cores)
    memory_bandwidth: float  #: bytes/s of device memory
    memory_bytes: int  #: device memory
    compute_efficiency: float = 0.526  #: achieved fraction of peak FLOP/s in large GEMMs
    memory_efficiency: float = 0.765  #: achieved fraction of memory bandwidth when streaming weights
    usable_memory_fraction: float = 0.6  #: share of memory for weights + KV (rest: runtime, buffers)

    def flops(self, bytes_per_param: int) -> float:
        """Peak FLOP/s for the model's storage width (fp32 for 4 bytes, tensor cores otherwise)."""
        return self.fp32_flops if bytes_per_param >= 4 else self.fp16_flops


@dataclass(frozen=True)
class Link:
    """A communication link: bandwidth and per-message latency."""

    bandwidth: float  #: bytes/s
    latency: float  #: seconds per message (per ring step for all-reduce)

    def send(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` in one message."""
        return self.latency + nbytes / self.bandwidth

    def all_reduce(self, nbytes: float, ranks: int) -> float:
        """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` participants."""
        if ranks <= 1:
            return 0.0
        steps = 2 * (ranks - 1)
        return steps * self.latency + steps / ranks * nbytes / self.bandwidth


class AnalyticProfile(InstanceProfile):
    """Roofline profile of an instance with ``devices_per_instance`` copies of ``device``.

    A layer's time is ``max(FLOPs / (peak * compute_efficiency), bytes / (bandwidth *
    memory_efficiency))`` plus two ring all-reduces of the layer's output (after attention and
    after the MLP) over ``intra`` when the tensor group fits one instance, else over ``network``.
    Decode reads every weight once per step plus the KV of the mean context
    (input + output / 2 tokens); prefill is usually compute-bound.
    """

    def __init__(self, name: str, device: DeviceSpec, devices_per_instance: int, intra: Link,
                 network: Link, max_tensor: int = 8) -> None:
        """Describe an instance type; ``network`` is the instance's link shared by its devices."""
        self.name = name
        self.device = device
        self.devices_per_instance = devices_per_instance
        self.device_memory_bytes = int(device.memory_bytes * device.usable_memory_fraction)
        self.network_bandwidth = network.bandwidth / devices_per_instance
        self.intra = intra
        self.network = network
        self.max_tensor = max_tensor

    def tensor_degrees(self) -> tuple[int, ...]:
        """Powers of two up to ``max_tensor``."""
        return tuple(1 << i for i in range(self.max_tensor.bit_length()) if 1 << i <= self.max_tensor)

    def _link(self, tensor: int) -> Link:
        return self.intra if tensor <= self.devices_per_instance else self.network

    def _roofline(self, model: ModelSpec, flops: float, nbytes: float) -> float:
        compute = flops / (self.device.flops(model.bytes_per_param) * self.device.compute_efficiency)
        memory = nbytes / (self.device.memory_bandwidth * self.device.memory_efficiency)
        return max(compute, memory)

    def layer_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                   workload: Workload) -> OpTime:
        """Roofline time of one layer's shard plus its two all-reduces."""
        matrix_params = model.params_per_layer - 2 * model.hidden_size
        attn_width = 4 * model.num_heads * model.head_dim  # FLOPs per (query, key) pair
        kv_token = model.kv_bytes_per_token_per_layer
        if phase is Phase.PREFILL:
            tokens = micro_batch * workload.input_len
            pairs = micro_batch * workload.input_len * (workload.input_len + 1) / 2
            kv_bytes = tokens * kv_token
        else:
            tokens = micro_batch
            context = workload.input_len + workload.output_len / 2
            pairs = micro_batch * context
            kv_bytes = micro_batch * context * kv_token
        flops = (2 * matrix_params * tokens + attn_width * pairs) / tensor
        nbytes = (matrix_params * model.bytes_per_param + kv_bytes) / tensor
        activation = tokens * model.hidden_size * model.bytes_per_param
        comm = 2 * self._link(tensor).all_reduce(activation, tensor)
        return OpTime(self._roofline(model, flops, nbytes), comm)

    def head_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                  workload: Workload) -> OpTime:
        """The vocab-sharded LM head for the last position of each request, plus an all-gather
        of the logits (modelled as an all-reduce of the vocab row per request)."""
        params = model.vocab_size * model.hidden_size / tensor
        flops = 2 * params * micro_batch
        nbytes = params * model.bytes_per_param
        logits = micro_batch * model.vocab_size * model.bytes_per_param
        comm = self._link(tensor).all_reduce(logits, tensor)
        return OpTime(self._roofline(model, flops, nbytes), comm)

    def stage_hop_time(self, model: ModelSpec, phase: Phase, micro_batch: int,
                       workload: Workload) -> float:
        """Hidden states of the micro-batch over the network (stages are on different instances
        whenever a stage fills an instance, which SpotServe's numbers reflect)."""
        tokens = micro_batch * (workload.input_len if phase is Phase.PREFILL else 1)
        return self.network.send(tokens * model.hidden_size * model.bytes_per_param)


GB = 1e9
GIB = 1 << 30

#: Accelerators with public datasheet figures. Efficiencies: the T4 calibration (module docstring).
T4 = DeviceSpec("T4", fp32_flops=8.1e12, fp16_flops=65e12, memory_bandwidth=320 * GB,
                memory_bytes=16 * GIB)
A10G = DeviceSpec("A10G", fp32_flops=31.2e12, fp16_flops=125e12, memory_bandwidth=600 * GB,
                  memory_bytes=24 * GIB)
A100 = DeviceSpec("A100-40GB", fp32_flops=19.5e12, fp16_flops=312e12,
                  memory_bandwidth=1555 * GB, memory_bytes=40 * GIB)
H100 = DeviceSpec("H100-SXM", fp32_flops=67e12, fp16_flops=989e12, memory_bandwidth=3350 * GB,
                  memory_bytes=80 * GIB)

#: PCIe Gen3 between the T4s of a g4dn.12xlarge (no NVLink): effective all-reduce bandwidth.
PCIE_T4 = Link(bandwidth=8 * GB, latency=8e-6)
PCIE_A10G = Link(bandwidth=12 * GB, latency=15e-6)
NVLINK_A100 = Link(bandwidth=300 * GB, latency=5e-6)
NVLINK_H100 = Link(bandwidth=450 * GB, latency=4e-6)


def _network(gbps: float) -> Link:
    return Link(bandwidth=gbps * GB / 8, latency=80e-6)


def analytic_profile(kind: str) -> AnalyticProfile:
    """A preset analytic profile by instance type name.

    Known: "g4dn.xlarge" (1 x T4), "g4dn.12xlarge" (4 x T4, SpotServe's instance),
    "g5.12xlarge" (4 x A10G), "p4d.24xlarge" (8 x A100), "p5.48xlarge" (8 x H100).
    """
    presets = {
        "g4dn.xlarge": ("g4dn.xlarge (1 x T4)", T4, 1, PCIE_T4, _network(25)),
        "g4dn.12xlarge": ("g4dn.12xlarge (4 x T4)", T4, 4, PCIE_T4, _network(50)),
        "g5.12xlarge": ("g5.12xlarge (4 x A10G)", A10G, 4, PCIE_A10G, _network(40)),
        "p4d.24xlarge": ("p4d.24xlarge (8 x A100)", A100, 8, NVLINK_A100, _network(400)),
        "p5.48xlarge": ("p5.48xlarge (8 x H100)", H100, 8, NVLINK_H100, _network(3200)),
    }
    try:
        name, device, count, intra, network = presets[kind]
    except KeyError:
        raise ValueError(f"unknown instance type {kind!r}; known: {sorted(presets)}") from None
    return AnalyticProfile(name, device, count, intra, network)
