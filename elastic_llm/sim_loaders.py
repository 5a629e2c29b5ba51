"""File loaders for the fleet simulator (the simulator itself does no I/O).

Reads SpotServe's artifact files (profiles, availability traces, arrivals; see
`../shared/data/spotserve/README.md`) and ``elastic-llm profile`` output, and hands the text or
decoded JSON to the pure parsers of `elastic_llm.sim.traces` and `elastic_llm.planning`.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from elastic_llm.planning.errors import ProfileError
from elastic_llm.planning.measured import FORMAT, MeasuredProfile
from elastic_llm.planning.spotserve_profile import spotserve_profile
from elastic_llm.sim.traces import (
    Arrival,
    AvailabilityTrace,
    TraceFormatError,
    parse_arrivals,
    parse_event_csv,
    parse_spotserve_events,
)

PathLike = str | os.PathLike[str]


def _text(path: PathLike) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise TraceFormatError(f"cannot read {path}: {err}") from None


def load_profile(path: PathLike, model: str | None = None, max_tensor: int | None = None) -> MeasuredProfile:
    """A measured profile: SpotServe's JSON (``tp-<M>`` tables) or ``elastic-llm profile`` output.
    `model`: the `ModelSpec.name` a SpotServe profile times (its files do not say); `max_tensor`:
    the largest tensor degree kept (None: the file's ``max_tp``, as the artifact's optimizer)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ProfileError(f"cannot read profile {path}: {err}") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return MeasuredProfile(data)
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} is not a JSON object")
    return spotserve_profile(data, model=model, max_tensor=max_tensor)


def load_availability(path: PathLike) -> AvailabilityTrace:
    """An availability trace: SpotServe's JSON-lines events, or our ``ms,add|remove,node`` CSV.
    In SpotServe's ``*_ondemand`` traces the nodes added after a preemption are on-demand."""
    text = _text(path)
    if Path(path).suffix == ".csv":
        return parse_event_csv(text)
    trace = parse_spotserve_events(text)
    if "ondemand" not in Path(path).name:
        return trace
    return _mark_on_demand(trace)


def _mark_on_demand(trace: AvailabilityTrace) -> AvailabilityTrace:
    """SpotServe's A_S+O / B_S+O: each node added after the first preemption replaces a
    preempted one and is on the on-demand market (the artifact's cost counts them so)."""
    first_removal = min((e.time for e in trace.events if e.kind == "remove"), default=None)
    marked = set()
    if first_removal is not None:
        spot_adds = {e.instance for e in trace.events if e.kind == "add" and e.time <= first_removal}
        marked = {e.instance for e in trace.events if e.kind == "add" and e.instance not in spot_adds
                  and e.time > first_removal and _replaces(trace, e.time)}
    events = tuple(replace(e, market="on-demand") if e.instance in marked else e for e in trace.events)
    return AvailabilityTrace(events, trace.end)


def _replaces(trace: AvailabilityTrace, time: float) -> bool:
    """Whether an add at `time` follows a removal (within 120 s): a replacement."""
    return any(e.kind == "remove" and 0 <= time - e.time <= 120 for e in trace.events)


def load_arrivals(path: PathLike) -> tuple[Arrival, ...]:
    """SpotServe's arrivals file ``id,arrival_s,input_len,offset``."""
    return parse_arrivals(_text(path))
