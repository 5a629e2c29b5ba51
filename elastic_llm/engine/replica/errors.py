"""Errors of the sharded replica runtime (all derive from `ElasticLLMError`)."""

from __future__ import annotations

from elastic_llm.errors import ElasticLLMError


class ReplicaError(ElasticLLMError):
    """Base class of the sharded replica's errors."""


class ReplicaConfigError(ReplicaError, ValueError):
    """A parallel configuration this replica cannot run (D != 1, more stages than layers, ...)."""


class ReplicaWorkerError(ReplicaError, RuntimeError):
    """A worker process failed: it raised, exited or died. The replica is unusable afterwards."""


class ReplicaTimeoutError(ReplicaWorkerError, TimeoutError):
    """A worker process did not answer within the timeout."""
