"""Spot availability traces: events over time, the bundled A_S / B_S segments, scaling.

Pure stdlib (the simulator replays the same traces). A trace is a CSV file::

    # comment lines start with '#'
    offset_s,action,instance_id,market,price_per_hour
    0,acquire,s01,spot,1.9046
    540,preempt,s09,,
    1320,end,,,

``action`` is ``acquire`` (a new instance joins; ``market`` and ``price_per_hour`` describe it),
``preempt`` (the cloud reclaims it with a notice and a grace period), ``kill`` (it vanishes without
notice) or ``end`` (the single last row: the trace's length). Instances acquired at offset 0 form
the initial fleet.

The bundled traces (``traces/*.csv``) are OUR OWN, written to the shapes the SpotServe paper
reports for its trace segments (ANCHORS.md); the paper's event times are not public, so the times
here are our choice. Prices are AWS g4dn.12xlarge (spot $1.9046/h, on-demand $3.912/h).

* ``A_S``: 1320 s, instances 7 -> 8 -> 10 -> 9 -> 10 -> 8, 3 preempted, 4 acquired.
* ``B_S``: 1020 s, instances 10 -> 8 -> 7 -> 8 -> 9, 3 preempted, 2 acquired.
* ``A_S+O`` / ``B_S+O``: each preemption is replaced by an on-demand instance 90 s later. The
  paper's counts for these (A_S+O: 1380 s, 3 preempted, 6 acquired; B_S+O: 720 s, 3 preempted, 3
  acquired) do not fit "A_S / B_S plus three replacements", so they are other windows of the same
  spot segment: ``A_S+O`` = A_S from t = 120 s (after its first acquisition) for 1380 s,
  ``B_S+O`` = the first 720 s of B_S (before its spot acquisitions). `derived_trace` builds them
  and a test checks the bundled files against it.

Scaling for a small machine: `SpotTrace.capped` removes initial instances that are never
preempted, which keeps every churn event (and the shape, shifted down). The bundled traces
preempt only instances they acquired later (A_S) or a few initial ones (B_S), so
``load_trace("A_S").capped(4)`` replays 1 -> 2 -> 4 -> 3 -> 4 -> 2 workers and
``load_trace("B_S").capped(4)`` replays 4 -> 2 -> 1 -> 2 -> 3.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Literal, get_args

from elastic_llm.cluster.contracts import Market, parse_market
from elastic_llm.cluster.errors import ClusterConfigError

Action = Literal["acquire", "preempt", "kill"]
ACTIONS: tuple[Action, ...] = get_args(Action)

#: AWS g4dn.12xlarge prices (4 x T4), the SpotServe evaluation's instances.
G4DN_12XLARGE_SPOT_USD_PER_HOUR = 1.9046
G4DN_12XLARGE_ON_DEMAND_USD_PER_HOUR = 3.912

CSV_COLUMNS = ("offset_s", "action", "instance_id", "market", "price_per_hour")

#: Bundled trace name -> file in ``elastic_llm/cluster/traces/``.
TRACE_FILES = {"A_S": "a_s.csv", "B_S": "b_s.csv", "A_S+O": "a_s_o.csv", "B_S+O": "b_s_o.csv"}


@dataclass(frozen=True)
class SpotEvent:
    """One change of the fleet."""

    offset_s: float  #: seconds from the trace's start
    action: Action  #: "acquire", "preempt" (with notice) or "kill" (without)
    instance_id: str  #: the instance concerned
    market: Market = "spot"  #: market of an acquired instance
    price_per_hour: float = 0.0  #: USD per hour of an acquired instance

    @property
    def removes(self) -> bool:
        """True for events that take an instance away (preempt, kill)."""
        return self.action != "acquire"


@dataclass(frozen=True)
class SpotTrace:
    """A validated sequence of `SpotEvent` (sorted by offset) lasting ``duration_s``."""

    name: str  #: label
    duration_s: float  #: length of the trace (seconds)
    events: tuple[SpotEvent, ...]  #: events by offset; offset-0 acquisitions are the initial fleet
    _removed: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        live: set[str] = set()
        seen: set[str] = set()
        last = 0.0
        for event in self.events:
            where = f"trace {self.name!r} at {event.offset_s}s ({event.action} {event.instance_id})"
            if event.action not in ACTIONS or not event.instance_id:
                raise ClusterConfigError(f"{where}: bad action or empty instance id")
            if not last <= event.offset_s <= self.duration_s:
                raise ClusterConfigError(f"{where}: offsets must be sorted and within 0..{self.duration_s}")
            last = event.offset_s
            if event.action == "acquire":
                if event.instance_id in seen:
                    raise ClusterConfigError(f"{where}: instance ids cannot be reused")
                seen.add(event.instance_id)
                live.add(event.instance_id)
            elif event.instance_id not in live:
                raise ClusterConfigError(f"{where}: instance is not live")
            else:
                live.remove(event.instance_id)
        object.__setattr__(self, "_removed",
                           frozenset(e.instance_id for e in self.events if e.removes))

    # ---- reading ------------------------------------------------------------------------------
    @property
    def initial(self) -> tuple[SpotEvent, ...]:
        """Acquisitions at offset 0: the fleet the trace starts with."""
        return tuple(e for e in self.events if e.action == "acquire" and e.offset_s == 0)

    @property
    def churn(self) -> tuple[SpotEvent, ...]:
        """Every event after the initial fleet."""
        initial = set(self.initial)
        return tuple(e for e in self.events if e not in initial)

    @property
    def acquired(self) -> int:
        """Instances acquired after the start."""
        return sum(e.action == "acquire" for e in self.churn)

    @property
    def preempted(self) -> int:
        """Instances taken away (with or without notice)."""
        return len(self._removed)

    def shape(self) -> tuple[int, ...]:
        """Live instances at the start and after each distinct event time."""
        counts = [len(self.initial)]
        live = counts[0]
        churn = self.churn
        for i, event in enumerate(churn):
            live += -1 if event.removes else 1
            if i + 1 == len(churn) or churn[i + 1].offset_s != event.offset_s:
                counts.append(live)
        return tuple(counts)

    # ---- transforming -------------------------------------------------------------------------
    def capped(self, max_instances: int) -> SpotTrace:
        """The same churn with at most ``max_instances`` live at once.

        Drops initial instances that are never taken away (the last ones first), so every
        preemption and acquisition stays. Raises `ClusterConfigError` when that cannot reach the
        cap without emptying the fleet at some moment.
        """
        shape = self.shape()
        excess = max(shape) - max_instances
        if excess <= 0:
            return self
        stable = [e.instance_id for e in self.initial if e.instance_id not in self._removed]
        if excess > len(stable) or excess > min(shape) - 1:
            raise ClusterConfigError(
                f"trace {self.name!r} (shape {shape}) cannot be capped at {max_instances} instances "
                f"while keeping its churn; the smallest cap is "
                f"{max(shape) - min(len(stable), min(shape) - 1)}")
        dropped = set(stable[-excess:])
        return SpotTrace(f"{self.name}/cap{max_instances}", self.duration_s,
                         tuple(e for e in self.events if e.instance_id not in dropped))

    def window(self, start_s: float, end_s: float) -> SpotTrace:
        """The segment ``(start_s, end_s)``: instances live at ``start_s`` (after its events) become
        the initial fleet, later events move to ``offset - start_s``. ``end_s`` may pass the trace's end
        (the trace is taken to have no events there)."""
        if not 0 <= start_s < end_s:
            raise ClusterConfigError("window needs 0 <= start_s < end_s")
        live: dict[str, SpotEvent] = {}
        for event in self.events:  # the state at start_s (events at start_s included)
            if event.offset_s > start_s:
                break
            if event.action == "acquire":
                live[event.instance_id] = event
            else:
                live.pop(event.instance_id, None)
        initial = [replace(e, offset_s=0.0) for e in live.values()]
        inside = [replace(e, offset_s=e.offset_s - start_s) for e in self.events
                  if start_s < e.offset_s < end_s]
        return SpotTrace(f"{self.name}[{start_s:g}:{end_s:g}]", end_s - start_s, (*initial, *inside))

    def with_on_demand_replacements(self, delay_s: float = 90.0,
                                    price_per_hour: float = G4DN_12XLARGE_ON_DEMAND_USD_PER_HOUR,
                                    prefix: str = "od") -> SpotTrace:
        """Add an on-demand acquisition ``delay_s`` after each preemption or kill (those falling
        inside the trace)."""
        extra = [SpotEvent(e.offset_s + delay_s, "acquire", f"{prefix}{i:02d}", "on-demand", price_per_hour)
                 for i, e in enumerate((e for e in self.events if e.removes), start=1)
                 if e.offset_s + delay_s < self.duration_s]
        events = sorted((*self.events, *extra), key=lambda e: e.offset_s)
        return SpotTrace(f"{self.name}+O", self.duration_s, tuple(events))

    # ---- CSV ----------------------------------------------------------------------------------
    def to_csv(self, comment: str = "") -> str:
        """The trace as CSV text (`from_csv` reads it back)."""
        out = io.StringIO()
        for line in comment.splitlines():
            out.write(f"# {line}".rstrip() + "\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for e in self.events:
            acquire = e.action == "acquire"
            writer.writerow([f"{e.offset_s:g}", e.action, e.instance_id, e.market if acquire else "",
                             f"{e.price_per_hour:g}" if acquire else ""])
        writer.writerow([f"{self.duration_s:g}", "end", "", "", ""])
        return out.getvalue()

    @classmethod
    def from_csv(cls, text: str, name: str) -> SpotTrace:
        """Parse CSV text (see the module docstring)."""
        rows = csv.DictReader(line for line in io.StringIO(text) if not line.lstrip().startswith("#"))
        if tuple(rows.fieldnames or ()) != CSV_COLUMNS:
            raise ClusterConfigError(f"trace {name!r}: header must be {','.join(CSV_COLUMNS)}")
        events: list[SpotEvent] = []
        duration: float | None = None
        for number, row in enumerate(rows, start=2):
            try:
                if duration is not None:
                    raise ValueError("rows after 'end'")
                offset = float(row["offset_s"])
                action = row["action"].strip()
                if action == "end":
                    duration = offset
                    continue
                if action not in ACTIONS:
                    raise ValueError(f"unknown action {action!r}")
                acquire = action == "acquire"
                events.append(SpotEvent(
                    offset, action, row["instance_id"].strip(),  # type: ignore[arg-type]
                    parse_market(row["market"]) if acquire else "spot",
                    float(row["price_per_hour"]) if acquire else 0.0))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ClusterConfigError(f"trace {name!r}, data row {number}: {exc}") from exc
        if duration is None:
            raise ClusterConfigError(f"trace {name!r}: missing the final 'end' row")
        return cls(name, duration, tuple(events))


def load_trace(name: str) -> SpotTrace:
    """A bundled trace: ``"A_S"``, ``"B_S"``, ``"A_S+O"`` or ``"B_S+O"``."""
    try:
        filename = TRACE_FILES[name]
    except KeyError:
        raise ClusterConfigError(f"unknown trace {name!r}; bundled: {sorted(TRACE_FILES)}") from None
    text = resources.files("elastic_llm.cluster").joinpath("traces", filename).read_text()
    return SpotTrace.from_csv(text, name)


def derived_trace(name: str) -> SpotTrace:
    """How the ``+O`` traces are derived from the base ones (the bundled files must match)."""
    if name == "A_S+O":
        base = load_trace("A_S").window(120.0, 1500.0)
    elif name == "B_S+O":
        base = load_trace("B_S").window(0.0, 720.0)
    else:
        raise ClusterConfigError(f"{name!r} is not a derived trace")
    return replace(base.with_on_demand_replacements(), name=name)
