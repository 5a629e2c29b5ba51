"""`MeasuredProfile`: an `InstanceProfile` read from the JSON that ``elastic-llm profile`` writes.

The format (version ``elastic-llm-profile/1``); times are seconds, keys of tables are decimal
strings (JSON object keys), ``<M>`` a tensor degree and ``<b>`` a micro-batch size::

    {
      "format": "elastic-llm-profile/1",
      "name": "cpu-2core",                  # free text: the machine profiled
      "model": "smollm2-135m-instruct",     # ModelSpec.name it was measured with (null: any)
      "input_len": 128,                     # prompt tokens of the timed prefills
      "context_len": 160,                   # cached tokens during the timed decode steps
      "devices_per_instance": 1,
      "device_memory_bytes": 2000000000,    # bytes of weights + KV one worker may hold
      "network_bandwidth": 3.0e9,           # bytes/s between workers (migration)
      "layer":   {"prefill": {"<M>": {"<b>": s}}, "decode": {"<M>": {"<b>": s}}},
      "tp_comm": {"prefill": {"<M>": {"<b>": s}}, "decode": {...}},  # optional: all-reduce share
      "head":    {"prefill": {"<M>": {"<b>": s}}, "decode": {...}},  # optional: embed + LM head
      "stage_hop": {"prefill": {"<b>": s}, "decode": {"<b>": s}},     # optional
      "machine": {...}, "settings": {...}, "measured": {...},          # optional, informational
      "engine_check": [...]                                            # optional, informational
    }

The informational keys (``elastic-llm profile`` writes them: the machine, the settings, the raw
compute and all-reduce tables, and a check against the engine) are kept by `to_dict` and ignored
by the predictions; files without them load as before.

``layer`` is the wall time of one transformer layer including its all-reduces; ``tp_comm`` says
how much of it was all-reduce (default 0). Between measured micro-batch sizes times are
interpolated linearly; above the largest they are extrapolated along the last two points (or
proportionally to b when only one was measured); below the smallest the smallest is used. Prefill
times scale linearly with the workload's prompt length relative to ``input_len``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import Workload
from elastic_llm.planning.errors import ProfileError
from elastic_llm.planning.profiles import InstanceProfile, OpTime, Phase

FORMAT = "elastic-llm-profile/1"

Table = dict[int, dict[int, float]]  # {M: {b: seconds}}


class MeasuredProfile(InstanceProfile):
    """Per-layer timings of our own engine, as measured by ``elastic-llm profile``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        """Validate and index a decoded profile dict (use `from_json` to read a file)."""
        if data.get("format") != FORMAT:
            raise ProfileError(f"profile format must be {FORMAT!r}, got {data.get('format')!r}")
        try:
            self.name = str(data.get("name", "measured"))
            self.model_name: str | None = data.get("model")
            self.input_len = int(data["input_len"])
            self.context_len = int(data.get("context_len", self.input_len))
            self.devices_per_instance = int(data.get("devices_per_instance", 1))
            self.device_memory_bytes = int(data["device_memory_bytes"])
            self.network_bandwidth = float(data["network_bandwidth"])
            self._layer = {ph: _table(data["layer"][ph.value]) for ph in Phase}
            self._comm = {ph: _table(data.get("tp_comm", {}).get(ph.value, {})) for ph in Phase}
            self._head = {ph: _table(data.get("head", {}).get(ph.value, {})) for ph in Phase}
            hops = data.get("stage_hop", {})
            self._hop = {ph: {int(b): float(s) for b, s in hops.get(ph.value, {}).items()}
                         for ph in Phase}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ProfileError(f"malformed profile: {err!r}") from None
        if self.input_len < 1 or self.device_memory_bytes < 1 or self.network_bandwidth <= 0:
            raise ProfileError("input_len, device_memory_bytes and network_bandwidth must be > 0")
        if not self._layer[Phase.PREFILL] or set(self._layer[Phase.PREFILL]) != set(
                self._layer[Phase.DECODE]):
            raise ProfileError("layer.prefill and layer.decode must list the same tensor degrees")
        self._data = dict(data)

    @classmethod
    def from_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> MeasuredProfile:
        """Load from a JSON file path, or from an already decoded dict."""
        if isinstance(source, Mapping):
            return cls(source)
        try:
            return cls(json.loads(Path(source).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ProfileError(f"cannot read profile {source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The profile as the JSON-ready dict it was built from."""
        return dict(self._data)

    def tensor_degrees(self) -> tuple[int, ...]:
        """Tensor degrees that were measured."""
        return tuple(sorted(self._layer[Phase.PREFILL]))

    def _check(self, model: ModelSpec, tensor: int) -> None:
        if self.model_name and model.name != self.model_name:
            raise ProfileError(f"profile measured {self.model_name!r}, asked about {model.name!r}")
        if tensor not in self._layer[Phase.PREFILL]:
            raise ProfileError(f"profile has no tensor degree {tensor}; has {self.tensor_degrees()}")

    def _scale(self, phase: Phase, workload: Workload) -> float:
        return workload.input_len / self.input_len if phase is Phase.PREFILL else 1.0

    def layer_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                   workload: Workload) -> OpTime:
        """Measured layer time (all-reduce share from ``tp_comm``), scaled to the prompt length."""
        self._check(model, tensor)
        total = _lookup(self._layer[phase][tensor], micro_batch)
        comm = _lookup(self._comm[phase].get(tensor, {}), micro_batch)
        return OpTime(max(total - comm, 0.0), min(comm, total)).scaled(self._scale(phase, workload))

    def head_time(self, model: ModelSpec, phase: Phase, tensor: int, micro_batch: int,
                  workload: Workload) -> OpTime:
        """Measured embedding + LM head time (0 when not measured)."""
        self._check(model, tensor)
        return OpTime(_lookup(self._head[phase].get(tensor, {}), micro_batch))

    def stage_hop_time(self, model: ModelSpec, phase: Phase, micro_batch: int,
                       workload: Workload) -> float:
        """Measured stage-to-stage send (0 when not measured)."""
        return _lookup(self._hop[phase], micro_batch) * self._scale(phase, workload)


def _table(raw: Mapping[str, Mapping[str, float]]) -> Table:
    """Parse ``{"<M>": {"<b>": s}}`` into ints and floats, rejecting negative times."""
    table = {int(m): {int(b): float(s) for b, s in row.items()} for m, row in raw.items()}
    if any(s < 0 or b < 1 for row in table.values() for b, s in row.items()) or any(
            m < 1 or not row for m, row in table.items()):
        raise ProfileError("profile tables need M >= 1, b >= 1, times >= 0 and no empty rows")
    return table


def _lookup(row: Mapping[int, float], micro_batch: int) -> float:
    """Time for ``micro_batch`` from ``{b: seconds}``: interpolate, extrapolate upward (0 if empty)."""
    if not row:
        return 0.0
    sizes = np.array(sorted(row), dtype=float)
    times = np.array([row[int(b)] for b in sizes])
    if micro_batch <= sizes[-1]:
        return float(np.interp(micro_batch, sizes, times))
    if len(sizes) == 1:
        return float(times[0] * micro_batch / sizes[0])
    slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
    return float(times[-1] + slope * (micro_batch - sizes[-1]))
