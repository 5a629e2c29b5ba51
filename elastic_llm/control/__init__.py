"""Control layer: the fleet's state machine (`FleetState.handle(event, now) -> instructions`),
its events, instructions, wire messages and policies (strategy classes).

Pure policy like `elastic_llm.planning` and `elastic_llm.scheduling`: no torch, no dask, no clock
reads, no I/O, so the Dask enactor and the simulator run the same classes.
"""

from elastic_llm.control.config import FleetConfig
from elastic_llm.control.fleet import NoticeRecord, ReplicaRecord, ReplicaState, WorkerHealth, WorkerRecord
from elastic_llm.control.machine import FleetState
from elastic_llm.control.policies import (
    POLICY_NAMES,
    BeyondSpotServe,
    EvacuationPlan,
    FleetPolicy,
    Reparallelize,
    Reroute,
    SpotServe,
    UnknownPolicyError,
    policy_by_name,
)

__all__ = ["POLICY_NAMES", "EvacuationPlan", "FleetConfig", "FleetPolicy", "FleetState", "NoticeRecord",
           "ReplicaRecord", "ReplicaState", "Reparallelize", "Reroute", "SpotServe", "BeyondSpotServe", "UnknownPolicyError",
           "WorkerHealth", "WorkerRecord", "policy_by_name"]
