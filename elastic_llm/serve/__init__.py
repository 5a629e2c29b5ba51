"""Serve layer: the OpenAI-compatible HTTP gateway over a `ServingClient` and ``elastic-llm serve``.

`create_app` (FastAPI + sse-starlette), `GatewayServer` (uvicorn, SIGTERM drains),
`GatewaySettings` (limits and the API key), `serve` (the command). Imports the cluster layer's
public API only; decisions stay in the controller.
"""

from __future__ import annotations

from elastic_llm.serve.settings import API_KEY_ENV, GatewaySettings

__all__ = ["API_KEY_ENV", "GatewaySettings"]
