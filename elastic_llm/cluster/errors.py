"""Errors of the cluster layer."""

from __future__ import annotations

from elastic_llm.errors import ElasticLLMError


class ClusterConfigError(ElasticLLMError, ValueError):
    """Invalid cluster-layer input: instance metadata, a spot trace, an emulator setting."""


class EmulatorError(ElasticLLMError, RuntimeError):
    """The spot emulator could not carry out an event (unknown instance, worker failed to start)."""
