"""Availability and arrival traces for the fleet simulator, parsed from text (pure: no I/O).

Formats read (the loader `elastic_llm.sim_loaders` reads the files):

- SpotServe's event trace: one JSON list a line, ``[ms, "add" | "remove" | "DONE", {"nodes": [...]}]``;
- our CSV trace (also SpotServe's 12-hour ``g4dn_full.csv``): ``ms,add|remove,node`` a line;
- SpotServe's arrivals: ``id,arrival_s,input_len,offset`` a line;
- a synthetic availability trace (`synthetic_availability`) and Gamma arrivals (`gamma_arrivals`),
  both seeded.

A trace event's time is when it takes effect (an instance is usable, or gone); the simulator sends
the notice of a removal one grace period earlier, as SpotServe's controller does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from elastic_llm.errors import ElasticLLMError


class TraceFormatError(ElasticLLMError, ValueError):
    """A trace line that cannot be read (the message names the line)."""


@dataclass(frozen=True)
class InstanceEvent:
    """One instance appearing in or leaving the fleet."""

    time: float  #: seconds from the trace start when it takes effect
    kind: str  #: "add" or "remove"
    instance: str  #: the instance's name
    market: str = "spot"  #: "spot" or "on-demand"


@dataclass(frozen=True)
class AvailabilityTrace:
    """Instance events in time order and the trace's end (seconds)."""

    events: tuple[InstanceEvent, ...]  #: sorted by time
    end: float  #: when the trace ends (its DONE event, else the last event)

    def peak(self) -> int:
        """Most instances present at once."""
        alive, best = 0, 0
        for event in self.events:
            alive += 1 if event.kind == "add" else -1
            best = max(best, alive)
        return best


@dataclass(frozen=True)
class Arrival:
    """One request of an arrival trace."""

    time: float  #: seconds from the trace start
    input_len: int  #: prompt tokens
    output_len: int | None = None  #: output tokens (None: the simulation's `output_tokens`)


def _checked(events: list[InstanceEvent], end: float | None) -> AvailabilityTrace:
    events.sort(key=lambda e: (e.time, e.kind != "remove", e.instance))
    alive: set[str] = set()
    for event in events:
        if event.kind == "add":
            if event.instance in alive:
                raise TraceFormatError(f"instance {event.instance!r} added twice at {event.time} s")
            alive.add(event.instance)
        elif event.instance not in alive:
            raise TraceFormatError(f"instance {event.instance!r} removed at {event.time} s but not present")
        else:
            alive.discard(event.instance)
    last = events[-1].time if events else 0.0
    return AvailabilityTrace(tuple(events), max(last, end if end is not None else last))


def parse_spotserve_events(text: str, on_demand_marker: str | None = None) -> AvailabilityTrace:
    """SpotServe's JSON-lines event trace. Nodes named with `on_demand_marker` in them (the
    ``*_ondemand`` traces add nodes the artifact calls on-demand) are on the on-demand market."""
    events: list[InstanceEvent] = []
    end: float | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ms, kind, payload = json.loads(line)
            time = float(ms) / 1000.0
            if kind == "DONE":
                end = time
                continue
            if kind not in ("add", "remove"):
                raise ValueError(f"unknown event kind {kind!r}")
            nodes = [str(n) for n in payload["nodes"]]
        except (ValueError, TypeError, KeyError) as err:
            raise TraceFormatError(f"line {number}: {err}: {line[:80]!r}") from None
        if not math.isfinite(time) or time < 0:
            raise TraceFormatError(f"line {number}: bad time {ms!r}")
        for node in nodes:
            market = "on-demand" if on_demand_marker and on_demand_marker in node else "spot"
            events.append(InstanceEvent(time, kind, node, market))
    return _checked(events, end)


def parse_event_csv(text: str, market: str = "spot") -> AvailabilityTrace:
    """Our CSV trace ``ms,add|remove,node`` (SpotServe's ``g4dn_full.csv``); a header is skipped."""
    events: list[InstanceEvent] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (number == 1 and not fields[0].replace(".", "").isdigit()):
            continue
        try:
            ms, kind, node = fields
            time = float(ms) / 1000.0
        except ValueError as err:
            raise TraceFormatError(f"line {number}: {err}: {line[:80]!r}") from None
        if kind not in ("add", "remove") or not math.isfinite(time) or time < 0:
            raise TraceFormatError(f"line {number}: expected 'ms,add|remove,node', got {line[:80]!r}")
        events.append(InstanceEvent(time, kind, node, market))
    return _checked(events, None)


def parse_arrivals(text: str) -> tuple[Arrival, ...]:
    """SpotServe's arrivals ``id,arrival_s,input_len,offset``, in time order."""
    arrivals = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = line.split(",")
            time, length = float(fields[1]), int(fields[2])
        except (ValueError, IndexError) as err:
            raise TraceFormatError(f"arrivals line {number}: {err}: {line[:80]!r}") from None
        if not math.isfinite(time) or time < 0 or length < 1:
            raise TraceFormatError(f"arrivals line {number}: bad time or length: {line[:80]!r}")
        arrivals.append(Arrival(time, length))
    return tuple(sorted(arrivals, key=lambda a: a.time))


def gamma_arrivals(rate: float, cv: float, duration_s: float, input_len: int, seed: int) -> tuple[Arrival, ...]:
    """Gamma-distributed inter-arrival times (mean 1/rate, coefficient of variation `cv`), as
    SpotServe's generator draws them; at most `rate * duration_s * 4 + 100` requests."""
    if rate <= 0 or cv <= 0 or duration_s <= 0 or input_len < 1:
        raise ValueError("gamma_arrivals needs rate, cv, duration_s > 0 and input_len >= 1")
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(rate * duration_s * 4) + 100)
    times = np.cumsum(gaps)
    return tuple(Arrival(float(t), input_len) for t in times if t < duration_s)


def synthetic_availability(instances: int, duration_s: float, mean_lifetime_s: float, seed: int,
                           replace_after_s: float = 60.0) -> AvailabilityTrace:
    """`instances` spot instances at time 0; each lives an exponential time (mean
    `mean_lifetime_s`) and a replacement arrives `replace_after_s` after it goes. Seeded."""
    if instances < 1 or duration_s <= 0 or mean_lifetime_s <= 0 or replace_after_s < 0:
        raise ValueError("synthetic_availability needs instances >= 1 and positive times")
    rng = np.random.default_rng(seed)
    events: list[InstanceEvent] = []
    serial = 0
    for _ in range(instances):
        start = 0.0
        while start < duration_s:
            name = f"node-{serial}"
            serial += 1
            events.append(InstanceEvent(start, "add", name))
            stop = start + float(rng.exponential(mean_lifetime_s))
            if stop >= duration_s:
                break
            events.append(InstanceEvent(stop, "remove", name))
            start = stop + replace_after_s
    return _checked(events, duration_s)
