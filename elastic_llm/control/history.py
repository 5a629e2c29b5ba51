"""`FleetHistory`: a bounded record of the fleet over time, for dashboards that open late.

The controller calls `FleetHistory.observe(fleet, now, cost_usd, on_demand_only_usd)` on every
tick; the history compares the fleet with what it saw last and keeps

- samples (at most one per `interval_s`): latency and time-to-first-token percentiles of the
  requests that finished *since the previous sample* (so a preemption's effect is not averaged
  away), throughput, queue and running counts, the configuration (D replicas of (P, M)), and the
  dollars spent so far next to the on-demand-only counterfactual;
- events: instances joining, getting a preemption notice, leaving (preempted at their deadline
  or lost without one), notices handled (requests migrated with their KV or recomputed), shape
  switches of sharded replicas, configuration changes;
- instances: each worker ever seen (the latest `max_instances`), with market, price, when it
  joined, was noticed and left, so a departed instance stays on the timeline.

Everything is bounded (ring buffers), so memory does not grow with the length of a run. Pure:
`now` and the dollar figures come from the caller (no clock, no I/O), so the simulator can keep a
history of a replayed run exactly as the live controller does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from elastic_llm.control.fleet import ReplicaState, WorkerHealth
from elastic_llm.errors import ElasticLLMError

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState

#: Event kinds, in the words a dashboard shows.
EVENT_KINDS = ("joined", "notice", "preempted", "lost", "migration", "reshard", "configuration")


class HistoryBoundsError(ElasticLLMError, ValueError):
    """A history was asked for a non-positive size or a bad sampling interval."""


@dataclass(frozen=True)
class Sample:
    """The fleet at one moment; windowed figures cover (previous sample, this one]."""

    time: float  #: when (the controller's clock, epoch seconds live)
    window_s: float  #: seconds since the previous sample (0 for the first)
    finished: int  #: requests finished in the window
    latency_p50_s: float | None  #: median latency of those requests (None: none finished)
    latency_p99_s: float | None  #: P99 latency of those requests
    ttft_p50_s: float | None  #: median time to first token of those requests
    ttft_p99_s: float | None  #: P99 time to first token of those requests
    tokens_per_s: float  #: output tokens committed per second over the window
    queued: int  #: requests waiting for a replica
    running: int  #: requests on a replica
    replicas: int  #: D: replicas taking requests (ready)
    configuration: str  #: the ready replicas' shapes, e.g. "2 x (P=1, M=1)"; "none" when D = 0
    instances: int  #: workers held
    spot_instances: int  #: of them on the spot market
    cost_usd: float  #: dollars spent so far (every market)
    on_demand_only_usd: float  #: the same instance-seconds at the on-demand price


@dataclass(frozen=True)
class HistoryEvent:
    """Something that happened to an instance or to the deployment."""

    time: float  #: when it was seen
    kind: str  #: one of `EVENT_KINDS`
    subject: str  #: the worker or replica it concerns ("" for the deployment)
    detail: str  #: what, in words


@dataclass(frozen=True)
class InstanceLife:
    """One worker's life as the controller saw it (a bar on the instance timeline)."""

    worker: str  #: Dask worker address
    market: str  #: "spot", "on-demand" or "unknown"
    price_per_hour: float  #: USD per hour
    joined_at: float  #: when it joined
    noticed_at: float | None = None  #: when its preemption notice arrived
    deadline: float | None = None  #: when the notice said it would go
    left_at: float | None = None  #: when it left (None: still held)
    end: str = ""  #: "preempted" (left after a notice), "lost" (without one), "" while held
    state: str = "up"  #: its health while held ("up", "leaving", "suspect"), else `end`


@dataclass
class _Seen:
    """What the previous observation saw (to find what changed)."""

    time: float | None = None
    finished: int = 0
    ttft_count: int = 0
    tokens_committed: int = 0
    configuration: str = ""
    last_notice: object = None
    last_reshard: object = None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _latest(window: Iterable[float], count: int) -> list[float]:
    """The newest `count` values of a latency window (fewer if the window holds fewer)."""
    values = list(window)
    return values[len(values) - min(count, len(values)):] if count > 0 else []


def _new_items(ring: Iterable[object], last_seen: object) -> list[object]:
    """Items appended to a ring buffer since `last_seen` (by identity), oldest first."""
    fresh: list[object] = []
    for item in reversed(list(ring)):
        if item is last_seen:
            break
        fresh.append(item)
    return fresh[::-1]


def configuration_of(fleet: FleetState) -> tuple[int, str]:
    """D (ready replicas) and the configuration in words, e.g. ``"2 x (P=1, M=1)"``."""
    shapes: dict[tuple[int, int], int] = {}
    for replica in fleet.replicas.values():
        if replica.state is ReplicaState.READY:
            shapes[replica.parallel] = shapes.get(replica.parallel, 0) + 1
    words = " + ".join(f"{n} x (P={p}, M={m})" for (p, m), n in sorted(shapes.items()))
    return sum(shapes.values()), words or "none"


class FleetHistory:
    """Ring buffers of samples, events and instance lives (see the module docstring).

    Args:
        interval_s: least seconds between two samples.
        max_samples: samples kept (the newest); 3600 at 1 s is an hour.
        max_events: events kept (the newest).
        max_instances: instance lives kept: the held ones always, then the latest departed.
    """

    def __init__(self, interval_s: float = 1.0, max_samples: int = 3600, max_events: int = 2000,
                 max_instances: int = 500) -> None:
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise HistoryBoundsError("interval_s must be finite and >= 0")
        if min(max_samples, max_events, max_instances) < 1:
            raise HistoryBoundsError("max_samples, max_events and max_instances must be >= 1")
        self.interval_s = interval_s
        self.max_instances = max_instances
        self.samples: deque[Sample] = deque(maxlen=max_samples)  #: newest last
        self.events: deque[HistoryEvent] = deque(maxlen=max_events)  #: newest last
        self.instances: dict[str, InstanceLife] = {}  #: by worker address, in joining order
        self.samples_taken = 0  #: samples ever taken (a reader's cursor counts these)
        self.events_seen = 0  #: events ever recorded
        self._seen = _Seen()

    # ------------------------------------------------------------------ feeding
    def observe(self, fleet: FleetState, now: float, cost_usd: float = 0.0,
                on_demand_only_usd: float = 0.0) -> Sample | None:
        """Record what changed in `fleet` since the last call; take a sample if `interval_s` has
        passed since the previous one. Returns the sample taken, or None."""
        self._instances(fleet, now)
        self._notices_and_reshards(fleet, now)
        replicas, configuration = configuration_of(fleet)
        if configuration != self._seen.configuration:
            self._event(now, "configuration", "", f"D={replicas}: {configuration}")
            self._seen.configuration = configuration
        previous = self._seen.time
        if previous is not None and now - previous < self.interval_s:
            return None
        sample = self._sample(fleet, now, replicas, configuration, cost_usd, on_demand_only_usd)
        self.samples.append(sample)
        self.samples_taken += 1
        return sample

    def _sample(self, fleet: FleetState, now: float, replicas: int, configuration: str,
                cost_usd: float, on_demand_only_usd: float) -> Sample:
        table, totals, seen = fleet.table, fleet.table.totals, self._seen
        window = 0.0 if seen.time is None else max(0.0, now - seen.time)
        latencies = _latest(table.latencies, totals.finished - seen.finished)
        ttfts = _latest(table.ttfts, totals.ttft_count - seen.ttft_count)
        tokens = max(0, totals.tokens_committed - seen.tokens_committed)
        queued = len(table.queued())
        unfinished = totals.accepted - totals.finished - totals.failed
        seen.time, seen.finished, seen.ttft_count = now, totals.finished, totals.ttft_count
        seen.tokens_committed = totals.tokens_committed
        return Sample(
            time=now, window_s=window, finished=len(latencies),
            latency_p50_s=_percentile(latencies, 50), latency_p99_s=_percentile(latencies, 99),
            ttft_p50_s=_percentile(ttfts, 50), ttft_p99_s=_percentile(ttfts, 99),
            tokens_per_s=tokens / window if window > 0 else 0.0, queued=queued, running=unfinished - queued,
            replicas=replicas, configuration=configuration, instances=len(fleet.workers),
            spot_instances=sum(1 for w in fleet.workers.values() if w.market == "spot"),
            cost_usd=float(cost_usd), on_demand_only_usd=float(on_demand_only_usd))

    def _instances(self, fleet: FleetState, now: float) -> None:
        for address, worker in fleet.workers.items():
            life = self.instances.get(address)
            if life is None or life.left_at is not None:  # new, or the same address back again
                self.instances.pop(address, None)
                life = InstanceLife(address, worker.market, worker.price_per_hour, worker.joined_at or now)
                self._event(now, "joined", address, f"{worker.market} at ${worker.price_per_hour:.4g}/h")
            if worker.health is WorkerHealth.LEAVING and life.noticed_at is None:
                life = replace(life, noticed_at=now, deadline=worker.deadline)
                grace = "" if worker.deadline is None else f" in {max(0.0, worker.deadline - now):.0f} s"
                self._event(now, "notice", address, f"preemption{grace}")
            self.instances[address] = replace(life, state=worker.health.value)
        for address, life in list(self.instances.items()):
            if life.left_at is None and address not in fleet.workers:
                end = "preempted" if life.noticed_at is not None else "lost"
                self.instances[address] = replace(life, left_at=now, end=end, state=end)
                self._event(now, end, address, "left after its notice" if end == "preempted"
                            else "left without a notice")
        self._forget_departed()

    def _forget_departed(self) -> None:
        departed = [a for a, life in self.instances.items() if life.left_at is not None]
        for address in departed[:max(0, len(self.instances) - self.max_instances)]:
            del self.instances[address]

    def _notices_and_reshards(self, fleet: FleetState, now: float) -> None:
        notices = _new_items(fleet.notices, self._seen.last_notice)
        for notice in notices:
            moved, recomputed = getattr(notice, "migrated", 0), getattr(notice, "recomputed", 0)
            self._event(now, "migration", getattr(notice, "worker", ""),
                        f"{moved} request{'' if moved == 1 else 's'} moved with their KV, "
                        f"{recomputed} recompute{'s' if recomputed == 1 else ''}")
        if notices:
            self._seen.last_notice = notices[-1]
        reshards = _new_items(fleet.reshards, self._seen.last_reshard)
        for reshard in reshards:
            move = reshard if isinstance(reshard, dict) else {}
            self._event(now, "reshard", str(move.get("replica", "")),
                        f"(P, M) {move.get('old')} -> {move.get('new')}")
        if reshards:
            self._seen.last_reshard = reshards[-1]

    def _event(self, now: float, kind: str, subject: str, detail: str) -> None:
        self.events.append(HistoryEvent(now, kind, subject, detail))
        self.events_seen += 1

    # ------------------------------------------------------------------ reading
    def latest(self) -> dict[str, Any] | None:
        """The newest sample as plain data (None before the first)."""
        return asdict(self.samples[-1]) if self.samples else None

    def to_dict(self, since: int = 0) -> dict[str, Any]:
        """Plain data for the wire: samples after the first `since` ever taken (all that are
        kept when `since` is older than the buffer), every kept event and instance life, and
        `cursor` to pass as `since` next time."""
        skip = max(0, int(since) - (self.samples_taken - len(self.samples)))
        samples = list(self.samples)[skip:]
        return {"cursor": self.samples_taken, "interval_s": self.interval_s,
                "samples": [asdict(s) for s in samples],
                "events": [asdict(e) for e in self.events],
                "instances": [asdict(life) for life in self.instances.values()]}
