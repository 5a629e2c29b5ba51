"""Errors raised by the planning core.

They live here rather than in ``elastic_llm/errors.py`` because the planning core was built
alongside other sessions editing that file; every class derives from ``ElasticLLMError``.
"""

from __future__ import annotations

from elastic_llm.errors import ElasticLLMError


class PlanningError(ElasticLLMError, ValueError):
    """A planner was given inputs it cannot plan for (inconsistent configs, unknown workers, ...)."""


class NoFeasibleConfigError(PlanningError):
    """No parallel configuration fits the model into the available instances' memory."""


class MemoryBoundError(PlanningError):
    """No order of the migration's transfers keeps every worker within its memory bound."""


class ProfileError(PlanningError):
    """A measured profile is malformed, or lacks the tensor degree / batch size asked for."""
