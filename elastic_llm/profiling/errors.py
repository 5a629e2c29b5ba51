"""Errors raised while profiling; every class derives from ``ElasticLLMError``.

They live here rather than in ``elastic_llm/errors.py`` (as the planning core's do) because other
sessions edit that file concurrently.
"""

from __future__ import annotations

from elastic_llm.errors import ElasticLLMError


class ProfilingError(ElasticLLMError, ValueError):
    """Profiling settings the model cannot be profiled with (a tensor degree larger than its heads,
    non-positive sizes, a context longer than the model's window, ...)."""


class CommProfilingError(ProfilingError):
    """A communication measurement failed: a worker process crashed or did not answer in time."""
