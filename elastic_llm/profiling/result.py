"""`ProfileResult`: what a profiling run measured, as the JSON `MeasuredProfile` reads, and a table.

JSON mapping (format ``elastic-llm-profile/1``, see ``elastic_llm/planning/measured.py``):

* ``layer[phase][M][b]``   = one rank's layer compute + ``tp_comm[phase][M][b]``
* ``tp_comm[phase][M][b]`` = 2 x the all-reduce of the layer's output over M processes (one after
  attention, one after the MLP); absent without communication measurements
* ``head[phase][M][b]``    = embedding (whole) + final norm + rank 0's rows of the vocabulary-
  sharded LM head (AutoTP's split), for the last token of each request
* ``stage_hop[phase][b]``  = one-way send of the micro-batch's hidden states between two processes

plus the informational keys ``machine``, ``settings``, ``measured`` (raw compute and all-reduce
tables, where the network bandwidth and memory figures come from) and ``engine_check``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from elastic_llm.planning.measured import FORMAT
from elastic_llm.planning.profiles import Phase
from elastic_llm.profiling.machine import MachineInfo
from elastic_llm.profiling.settings import ProfileSettings

#: {phase: {M or group size: {b: seconds}}}
PhaseTable = Mapping[Phase, Mapping[int, Mapping[int, float]]]
#: {phase: {b: seconds}}
PhaseRow = Mapping[Phase, Mapping[int, float]]


@dataclass(frozen=True)
class EngineComparison:
    """The cost model's decode step against the engine's measured step (M=1, P=1)."""

    batch: int  #: requests decoding together
    context_len: int  #: prompt tokens of each request (decode steps run just above it)
    predicted: float  #: seconds per decode step predicted from the profile as written
    measured: float  #: median seconds per `LLMEngine.step()` while decoding
    predicted_same_time: float  #: predicted from layer/head timings taken alongside the engine's

    @property
    def ratio(self) -> float:
        """predicted / measured."""
        return self.predicted / self.measured

    @property
    def ratio_same_time(self) -> float:
        """predicted_same_time / measured."""
        return self.predicted_same_time / self.measured


@dataclass(frozen=True)
class ProfileResult:
    """Median timings of one profiling run (seconds), and how they were obtained."""

    model_name: str  #: `ModelSpec.name` of the model profiled
    settings: ProfileSettings  #: the settings, degrees resolved
    machine: MachineInfo  #: where
    compute: PhaseTable  #: one rank's (rank 0's) layer compute by degree and micro-batch
    head: PhaseTable  #: embedding + final norm + rank 0's LM-head rows by degree and micro-batch
    all_reduce: PhaseTable  #: one all-reduce of a layer output by group size (empty: not measured)
    stage_hop: PhaseRow  #: one-way stage-to-stage send by micro-batch (empty: not measured)
    network_bandwidth: float  #: bytes/s between worker processes
    bandwidth_source: str  #: how ``network_bandwidth`` was obtained
    device_memory_bytes: int  #: bytes of weights + KV one worker may hold
    memory_source: str  #: how ``device_memory_bytes`` was obtained
    engine_check: tuple[EngineComparison, ...] = ()  #: optional validation against the engine

    def tp_comm(self, phase: Phase, degree: int, batch: int) -> float:
        """Seconds of the layer's two all-reduces (0 for M=1 or when not measured)."""
        if degree < 2:
            return 0.0
        return 2 * self.all_reduce.get(phase, {}).get(degree, {}).get(batch, 0.0)

    def layer(self, phase: Phase, degree: int, batch: int) -> float:
        """Seconds of one layer on one rank, its all-reduces included."""
        return self.compute[phase][degree][batch] + self.tp_comm(phase, degree, batch)

    def to_json_dict(self) -> dict[str, Any]:
        """The profile as `MeasuredProfile.from_json` reads it (plus informational keys)."""
        settings = self.settings
        degrees, batches = settings.degrees, settings.batch_sizes
        data: dict[str, Any] = {
            "format": FORMAT,
            "name": f"{self.machine.cpu_model}, {self.machine.threads} thread(s)/process",
            "model": self.model_name,
            "input_len": settings.prefill_len,
            "context_len": settings.context_len,
            "devices_per_instance": 1,
            "device_memory_bytes": self.device_memory_bytes,
            "network_bandwidth": self.network_bandwidth,
            "layer": _by_phase(lambda ph, m, b: self.layer(ph, m, b), degrees, batches),
            "head": _by_phase(lambda ph, m, b: self.head[ph][m][b], degrees, batches),
        }
        comm_degrees = tuple(m for m in degrees if m in self.all_reduce.get(Phase.DECODE, {}))
        if comm_degrees:
            data["tp_comm"] = _by_phase(self.tp_comm, comm_degrees, batches)
        if self.stage_hop:
            data["stage_hop"] = {ph.value: _keyed(self.stage_hop[ph]) for ph in Phase}
        data["machine"] = self.machine.to_dict()
        data["settings"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in asdict(settings).items()}
        data["measured"] = {
            "compute": _table_json(self.compute),
            "head": _table_json(self.head),
            "all_reduce": _table_json(self.all_reduce),
            "network_bandwidth_source": self.bandwidth_source,
            "device_memory_source": self.memory_source,
        }
        if self.engine_check:
            data["engine_check"] = [{**asdict(c), "ratio": c.ratio,
                                     "ratio_same_time": c.ratio_same_time}
                                    for c in self.engine_check]
        return data


def write_profile(result: ProfileResult, path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as profile JSON to ``path`` (parent directories created); the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result.to_json_dict(), indent=2) + "\n")
    return target


def format_table(result: ProfileResult) -> str:
    """A compact human-readable summary, times in milliseconds."""
    s = result.settings
    batches = s.batch_sizes
    header = "".join(f"{f'b={b}':>9}" for b in batches)
    phases = (f"prefill ({s.prefill_len} tokens/request)",
              f"decode (1 token at context {s.context_len})")
    width = max(len(header), len(phases[0]) + 1)
    lines = [f"{result.model_name} on {result.machine.summary}; medians of {s.repeats} (ms)",
             f"{'':<28}{phases[0]:<{width}}| {phases[1]}",
             f"{'':<28}{header:>{width}}| {header}"]

    def row(label: str, values: PhaseRow) -> None:
        cells = ["".join(f"{_ms(values.get(ph, {}).get(b)):>9}" for b in batches) for ph in Phase]
        lines.append(f"{label:<28}{cells[0]:>{width}}| {cells[1]}")

    for m in s.degrees:
        row(f"layer compute M={m}", {ph: result.compute[ph][m] for ph in Phase})
    for m in sorted(result.all_reduce.get(Phase.DECODE, {})):
        row(f"all-reduce x1, {m} procs", {ph: result.all_reduce[ph][m] for ph in Phase})
    if result.all_reduce:
        for m in s.degrees:
            row(f"layer total M={m}", {ph: {b: result.layer(ph, m, b) for b in batches}
                                       for ph in Phase})
    for m in s.degrees:
        row(f"embed+norm+LM head M={m}", {ph: result.head[ph][m] for ph in Phase})
    if result.stage_hop:
        row("stage hop (one way)", result.stage_hop)
    lines.append(f"network bandwidth {result.network_bandwidth / 1e9:.2f} GB/s "
                 f"({result.bandwidth_source}); worker memory "
                 f"{result.device_memory_bytes / 2**30:.1f} GiB ({result.memory_source})")
    for check in result.engine_check:
        lines.append(f"decode step b={check.batch}: engine {check.measured * 1e3:.1f} ms; "
                     f"predicted {check.predicted * 1e3:.1f} ms from the profile "
                     f"(x{check.ratio:.2f}), {check.predicted_same_time * 1e3:.1f} ms from "
                     f"timings taken alongside (x{check.ratio_same_time:.2f})")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def _keyed(row: Mapping[int, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in sorted(row.items())}


def _table_json(table: PhaseTable) -> dict[str, dict[str, dict[str, float]]]:
    return {ph.value: {str(m): _keyed(row) for m, row in sorted(table.get(ph, {}).items())}
            for ph in Phase}


def _by_phase(value: Any, degrees: tuple[int, ...], batches: tuple[int, ...]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """``{phase: {M: {b: value(phase, M, b)}}}`` with string keys."""
    return {ph.value: {str(m): {str(b): float(value(ph, m, b)) for b in batches} for m in degrees}
            for ph in Phase}
