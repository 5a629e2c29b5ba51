"""The gateway's Prometheus metrics, in a registry of its own (served at ``GET /metrics``) next to
the controller's figures (`ControllerCollector` over `ServingClient.status`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from elastic_llm.cluster.metrics import ControllerCollector

PREFIX = "elastic_llm_gateway"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """Counters of one gateway. `status` reads the controller's status (called at scrape time)."""

    def __init__(self, status: Callable[[], dict[str, Any]] | None, pending: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter(f"{PREFIX}_responses", "HTTP responses by route and status code",
                                 ["route", "code"], registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated for clients",
                                         registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens received",
                                     registry=self.registry)
        self.disconnects = Counter(f"{PREFIX}_client_disconnects",
                                   "Requests cancelled because their client went away", registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Request arrival to its first text",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_seconds", "Request arrival to its last byte",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        pending_gauge = Gauge(f"{PREFIX}_pending_generations", "Generations admitted and unfinished",
                              registry=self.registry)
        pending_gauge.set_function(lambda: float(pending()))
        if status is not None:
            self.registry.register(ControllerCollector(status))  # type: ignore[arg-type]

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
