"""The cluster layer's boundary nouns: what an instance is, and a notice that it will go away.

Pure stdlib (no dask, no torch), so the simulator and the cost accounting can use them too. Both
travel as plain msgpack-friendly dicts (`to_dict` / `from_dict`) through Dask messages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from elastic_llm.cluster.errors import ClusterConfigError

if TYPE_CHECKING:
    from elastic_llm.planning.config import Worker

#: "unknown": a worker that carries no instance metadata (billed at a configured default price).
Market = Literal["spot", "on-demand", "unknown"]

#: The markets an instance can be bought on.
MARKETS: tuple[Market, ...] = get_args(Market)

#: "No memory budget": the same sentinel as `elastic_llm.planning.config.Worker.memory_bytes`.
UNBOUNDED_MEMORY = 1 << 62

#: Grace period assumed when none is given: the shortest the clouds give (GCP, Azure: 30 s).
DEFAULT_GRACE_S = 30.0


def _check_finite(name: str, value: float, *, minimum: float | None = 0.0) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClusterConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ClusterConfigError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class InstanceInfo:
    """What the controller knows about the machine behind one Dask worker.

    A worker process stands for one instance (one GPU in the SpotServe setting). The Dask worker
    carries it from start-up (`elastic_llm.cluster.instance.InstanceMetadata`), so the scheduler
    sees it in the worker's registration message.
    """

    instance_id: str  #: unique id of the machine (the Dask worker name when emulated)
    market: Market = "on-demand"  #: "spot" (preemptible) or "on-demand"
    price_per_hour: float = 0.0  #: USD per hour the instance costs while it is held
    memory_bytes: int = UNBOUNDED_MEMORY  #: bytes of weights + KV the instance may hold at once
    grace_s: float = DEFAULT_GRACE_S  #: seconds between a preemption notice and the instance's death

    def __post_init__(self) -> None:
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise ClusterConfigError("InstanceInfo.instance_id must be a non-empty string")
        if self.market not in MARKETS:
            raise ClusterConfigError(f"InstanceInfo.market must be one of {MARKETS}, got {self.market!r}")
        _check_finite("InstanceInfo.price_per_hour", self.price_per_hour)
        _check_finite("InstanceInfo.grace_s", self.grace_s)
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < 0:
            raise ClusterConfigError(
                f"InstanceInfo.memory_bytes must be an int >= 0, got {self.memory_bytes!r}")

    @property
    def preemptible(self) -> bool:
        """True for spot instances."""
        return self.market == "spot"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack-friendly) for Dask messages."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceInfo:
        """Inverse of `to_dict`; unknown keys are ignored so newer senders stay readable."""
        fields = {k: data[k] for k in ("instance_id", "market", "price_per_hour", "memory_bytes", "grace_s")
                  if k in data}
        return cls(**fields)

    def to_planning_worker(self, address: str) -> Worker:
        """The planners' view of this instance: `elastic_llm.planning.config.Worker`."""
        from elastic_llm.planning.config import Worker

        return Worker(name=address, instance=self.instance_id, memory_bytes=self.memory_bytes)


@dataclass(frozen=True)
class PreemptionNotice:
    """The cloud (or an emulator, or an operator) announced that an instance will go away."""

    worker: str  #: address of the Dask worker that will be lost
    instance_id: str  #: the instance behind it
    deadline: float  #: wall-clock time (seconds since the epoch) at which it disappears
    source: str  #: who said so: "aws", "gcp", "azure", "api", "emulator", ...

    def __post_init__(self) -> None:
        if not self.worker:
            raise ClusterConfigError("PreemptionNotice.worker must be a non-empty address")
        _check_finite("PreemptionNotice.deadline", self.deadline, minimum=None)

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline at wall time ``now`` (negative once it has passed)."""
        return self.deadline - now

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack-friendly): also the keyword arguments of the scheduler handler."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreemptionNotice:
        """Inverse of `to_dict`."""
        return cls(worker=str(data["worker"]), instance_id=str(data.get("instance_id", "")),
                   deadline=float(data["deadline"]), source=str(data.get("source", "")))


def parse_market(value: str) -> Market:
    """Validate a market name read from a file or an environment variable."""
    value = value.strip()
    if value not in MARKETS:
        raise ClusterConfigError(f"market must be one of {MARKETS}, got {value!r}")
    return cast(Market, value)

