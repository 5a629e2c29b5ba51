"""Dollar cost of a fleet: instance-seconds times hourly price (pure: no dask, no clock reads).

Each instance is billed from the moment it joins to the moment it leaves (per second, as AWS,
GCP and Azure bill). The on-demand-only counterfactual charges the same instance-seconds at the
on-demand price: what the same capacity would have cost without spot instances (SpotServe's
"54% cheaper than on-demand only" compares these two).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from elastic_llm.cluster.contracts import Market, parse_market
from elastic_llm.cluster.errors import ClusterConfigError

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class InstanceSpan:
    """One instance held from ``joined_at`` to ``left_at`` (seconds, any common clock)."""

    instance_id: str  #: the instance
    market: Market  #: "spot", "on-demand" or "unknown"
    price_per_hour: float  #: USD per hour
    joined_at: float  #: when it joined the fleet
    left_at: float  #: when it left (or the end of the accounting window)

    def __post_init__(self) -> None:
        parse_market(self.market)
        finite = math.isfinite(self.joined_at) and math.isfinite(self.left_at)
        if not finite or self.left_at < self.joined_at:
            raise ClusterConfigError(f"InstanceSpan {self.instance_id}: needs joined_at <= left_at, finite")
        if not math.isfinite(self.price_per_hour) or self.price_per_hour < 0:
            raise ClusterConfigError(f"InstanceSpan {self.instance_id}: price must be finite and >= 0")

    @property
    def seconds(self) -> float:
        """Instance-seconds held."""
        return self.left_at - self.joined_at

    @property
    def cost_usd(self) -> float:
        """What the span cost."""
        return self.seconds * self.price_per_hour / SECONDS_PER_HOUR


@dataclass(frozen=True)
class CostReport:
    """Cost of a fleet over a window, split by market, with the on-demand-only counterfactual."""

    spans: tuple[InstanceSpan, ...]  #: the instances billed
    spot_instance_seconds: float  #: instance-seconds of spot instances
    on_demand_instance_seconds: float  #: instance-seconds of on-demand instances
    spot_usd: float  #: what the spot instances cost
    on_demand_usd: float  #: what the on-demand instances cost
    tokens: int  #: tokens served in the window (0 when unknown)
    on_demand_price_per_hour: float  #: the price the counterfactual charges
    on_demand_only_usd: float  #: every instance-second at the on-demand price
    unknown_instance_seconds: float = 0.0  #: instance-seconds of workers without metadata
    unknown_usd: float = 0.0  #: what they cost at the price the controller assumed for them

    @property
    def total_usd(self) -> float:
        """Spot plus on-demand."""
        return self.spot_usd + self.on_demand_usd + self.unknown_usd

    @property
    def instance_seconds(self) -> float:
        """All instance-seconds."""
        return self.spot_instance_seconds + self.on_demand_instance_seconds + self.unknown_instance_seconds

    @property
    def usd_per_1k_tokens(self) -> float | None:
        """Total cost per thousand tokens served (None when no token was served)."""
        return self.total_usd * 1000.0 / self.tokens if self.tokens else None

    @property
    def on_demand_only_usd_per_1k_tokens(self) -> float | None:
        """The counterfactual's cost per thousand tokens."""
        return self.on_demand_only_usd * 1000.0 / self.tokens if self.tokens else None

    @property
    def savings_vs_on_demand(self) -> float:
        """Fraction saved against on-demand only (0.54 = "54% cheaper"); 0 for an empty fleet."""
        if self.on_demand_only_usd <= 0:
            return 0.0
        return 1.0 - self.total_usd / self.on_demand_only_usd


def cost_report(spans: Iterable[InstanceSpan], *, on_demand_price_per_hour: float,
                tokens: int = 0) -> CostReport:
    """Sum ``spans`` into a `CostReport`."""
    if not math.isfinite(on_demand_price_per_hour) or on_demand_price_per_hour < 0:
        raise ClusterConfigError("on_demand_price_per_hour must be finite and >= 0")
    if tokens < 0:
        raise ClusterConfigError("tokens must be >= 0")
    spans = tuple(spans)
    spot = [s for s in spans if s.market == "spot"]
    on_demand = [s for s in spans if s.market == "on-demand"]
    unknown = [s for s in spans if s.market == "unknown"]
    seconds = sum(s.seconds for s in spans)
    return CostReport(
        spans=spans,
        spot_instance_seconds=sum(s.seconds for s in spot),
        on_demand_instance_seconds=sum(s.seconds for s in on_demand),
        spot_usd=sum(s.cost_usd for s in spot),
        on_demand_usd=sum(s.cost_usd for s in on_demand),
        tokens=tokens,
        on_demand_price_per_hour=on_demand_price_per_hour,
        on_demand_only_usd=seconds * on_demand_price_per_hour / SECONDS_PER_HOUR,
        unknown_instance_seconds=sum(s.seconds for s in unknown),
        unknown_usd=sum(s.cost_usd for s in unknown),
    )


@dataclass
class _Open:
    market: Market
    price_per_hour: float
    joined_at: float


class CostLedger:
    """Records joins and leaves as they happen; reports at any time (time is a parameter).

    An instance may join again after leaving (a new span). Instances still present are billed up
    to ``now`` in `spans` / `report`.
    """

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._closed: list[InstanceSpan] = []

    def join(self, instance_id: str, market: Market, price_per_hour: float, at: float) -> None:
        """``instance_id`` joined the fleet at ``at`` (ignored if it is already present)."""
        if instance_id not in self._open:
            self._open[instance_id] = _Open(parse_market(market), price_per_hour, at)

    def leave(self, instance_id: str, at: float) -> None:
        """``instance_id`` left the fleet at ``at`` (ignored if it is not present)."""
        held = self._open.pop(instance_id, None)
        if held is not None:
            self._closed.append(InstanceSpan(instance_id, held.market, held.price_per_hour,
                                             held.joined_at, max(at, held.joined_at)))

    @property
    def present(self) -> frozenset[str]:
        """Instances currently held."""
        return frozenset(self._open)

    def spans(self, now: float) -> tuple[InstanceSpan, ...]:
        """Closed spans plus the open ones billed up to ``now``."""
        still = [InstanceSpan(i, h.market, h.price_per_hour, h.joined_at, max(now, h.joined_at))
                 for i, h in self._open.items()]
        return (*self._closed, *still)

    def report(self, now: float, *, on_demand_price_per_hour: float, tokens: int = 0) -> CostReport:
        """`cost_report` of everything held up to ``now``."""
        return cost_report(self.spans(now), on_demand_price_per_hour=on_demand_price_per_hour,
                           tokens=tokens)
