"""Measuring our engine for the cost model: ``elastic-llm profile`` (engine tier: uses torch).

* ``settings``  - `ProfileSettings`: degrees, batch sizes, lengths, repeats, threads
* ``compute``   - one tensor rank's shard of a decoder layer, and the embedding/head, timed
* ``comm``      - gloo all-reduce and stage-hop latencies between spawned processes
* ``runner``    - `profile_model`: everything above into a `ProfileResult`
* ``result``    - `ProfileResult` as the JSON `MeasuredProfile` reads, and as a table
* ``engine_check`` - the cost model's decode step on a profile against `LLMEngine.step()`
"""

from elastic_llm.profiling.errors import CommProfilingError, ProfilingError
from elastic_llm.profiling.machine import MachineInfo, describe_machine
from elastic_llm.profiling.result import (
    EngineComparison,
    ProfileResult,
    format_table,
    write_profile,
)
from elastic_llm.profiling.runner import profile_model
from elastic_llm.profiling.settings import ProfileSettings, default_degrees

__all__ = [
    "CommProfilingError",
    "EngineComparison",
    "MachineInfo",
    "ProfileResult",
    "ProfileSettings",
    "ProfilingError",
    "default_degrees",
    "describe_machine",
    "format_table",
    "profile_model",
    "write_profile",
]
