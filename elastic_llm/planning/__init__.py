"""SpotServe's planning core (policy layer: pure; stdlib, numpy, scipy; no torch, dask, I/O or clock).

Modules, in the order a reconfiguration uses them:

* ``config``      - `ParallelConfig`, `Position`, `Placement`, `Worker`, `Workload`
* ``slices``      - AutoTP shard sizes and the slice algebra (bytes held and shared by positions)
* ``profiles`` / ``measured`` - analytic (T4, A10G, A100, H100) and measured instance profiles
* ``cost_model``  - latency / throughput / memory breakdown of a configuration
* ``optimizer``   - configuration choice (rate-aware, switch cost, cost-aware on-demand)
* ``mapper``      - Kuhn-Munkres device mapping (two-level for multi-GPU instances)
* ``migration``   - memory-bounded progressive migration plans
* ``arrangement`` - grace-period decisions (decode more, pause, or recompute)
"""

from elastic_llm.planning.arrangement import (
    Arrangement,
    BatchAction,
    BatchDecision,
    GracePeriod,
    MigrationTimeModel,
    RunningBatch,
    RunningRequest,
    arrange,
)
from elastic_llm.planning.config import (
    ParallelConfig,
    Placement,
    Position,
    Worker,
    Workload,
    stage_layer_range,
)
from elastic_llm.planning.cost_model import CostBreakdown, CostModel, PhaseBreakdown
from elastic_llm.planning.errors import (
    MemoryBoundError,
    NoFeasibleConfigError,
    PlanningError,
    ProfileError,
)
from elastic_llm.planning.mapper import DeviceMapper, MappingResult, inherit_replicas
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.migration import (
    MigrationPlan,
    MigrationPlanner,
    Release,
    StageReadiness,
    Transfer,
)
from elastic_llm.planning.optimizer import (
    Choice,
    ConfigOptimizer,
    Market,
    SearchSpace,
    SwitchCost,
    spotserve_pipeline_degrees,
)
from elastic_llm.planning.profiles import (
    AnalyticProfile,
    DeviceSpec,
    InstanceProfile,
    Link,
    OpTime,
    Phase,
    analytic_profile,
)
from elastic_llm.planning.slices import Part, Slice, SliceAlgebra, shard_sizes

__all__ = [
    "AnalyticProfile", "Arrangement", "BatchAction", "BatchDecision", "Choice", "ConfigOptimizer",
    "CostBreakdown", "CostModel", "DeviceMapper", "DeviceSpec", "GracePeriod", "InstanceProfile",
    "Link", "MappingResult", "Market", "MeasuredProfile", "MemoryBoundError", "MigrationPlan",
    "MigrationPlanner", "MigrationTimeModel", "NoFeasibleConfigError", "OpTime", "ParallelConfig",
    "Part", "Phase", "PhaseBreakdown", "Placement", "PlanningError", "Position", "ProfileError",
    "Release", "RunningBatch", "RunningRequest", "SearchSpace", "Slice", "SliceAlgebra",
    "StageReadiness", "SwitchCost", "Transfer", "Worker", "Workload", "analytic_profile", "arrange",
    "inherit_replicas", "shard_sizes", "spotserve_pipeline_degrees", "stage_layer_range",
]
