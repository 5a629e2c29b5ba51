"""Cluster layer: Dask-facing building blocks of elastic serving.

Pure modules (stdlib only, usable by the simulator): `contracts` (`InstanceInfo`,
`PreemptionNotice`), `traces` (spot traces), `cost` (dollar accounting).
Dask modules: `instance` (worker metadata), `notices` (`NoticeBoard`), `metadata`
(`MetadataWatcher`), `emulator` (`SpotEmulator`), `downscaling` (`ScaleDownVeto`);
`serialization` needs torch.

Names are imported lazily so that importing a pure module does not pull in dask or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic_llm.cluster.contracts import InstanceInfo, PreemptionNotice
    from elastic_llm.cluster.cost import CostLedger, CostReport, InstanceSpan, cost_report
    from elastic_llm.cluster.downscaling import ScaleDownVeto
    from elastic_llm.cluster.emulator import EmulatorRecord, SpotEmulator
    from elastic_llm.cluster.instance import InstanceMetadata, fleet_info, get_fleet_info, instance_info
    from elastic_llm.cluster.metadata import MetadataWatcher
    from elastic_llm.cluster.notices import NoticeBoard, send_preemption_notice
    from elastic_llm.cluster.serialization import TensorSerializerPlugin, register_tensor_serializer
    from elastic_llm.cluster.traces import SpotEvent, SpotTrace, load_trace

_LAZY = {
    "InstanceInfo": "contracts", "PreemptionNotice": "contracts",
    "CostLedger": "cost", "CostReport": "cost", "InstanceSpan": "cost", "cost_report": "cost",
    "ScaleDownVeto": "downscaling",
    "EmulatorRecord": "emulator", "SpotEmulator": "emulator",
    "InstanceMetadata": "instance", "fleet_info": "instance", "get_fleet_info": "instance",
    "instance_info": "instance",
    "MetadataWatcher": "metadata",
    "NoticeBoard": "notices", "send_preemption_notice": "notices",
    "TensorSerializerPlugin": "serialization", "register_tensor_serializer": "serialization",
    "SpotEvent": "traces", "SpotTrace": "traces", "load_trace": "traces",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"elastic_llm.cluster.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'elastic_llm.cluster' has no attribute {name!r}")


__all__ = sorted(_LAZY)
