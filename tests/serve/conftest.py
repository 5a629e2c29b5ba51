"""Fixtures of the gateway tests: a tiny model with SmolLM2's tokenizer, a cluster serving it,
and the gateway on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.model.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from elastic_llm.serve.server import GatewayServer
from elastic_llm.serve.settings import GatewaySettings
from tests.cluster.helpers import local_cluster
from tests.conftest import TINY_CONFIGS, build_tiny_checkpoint

MODEL_NAME = "tiny-chat"
API_KEY = "test-key-123"
CONTEXT = 256


def tokenizer_checkpoint(directory: Path) -> Path:
    """One layer, SmolLM2's vocabulary, tokenizer and chat template (random weights)."""
    fields = {**TINY_CONFIGS["llama-gqa-untied"], "vocab_size": 49152, "num_hidden_layers": 1,
              "max_position_embeddings": CONTEXT}
    build_tiny_checkpoint(directory, "tiny", fields=fields)
    source = resolve_checkpoint(DEFAULT_MODEL)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def gateway(chat_checkpoint: Path) -> Iterator[GatewayServer]:
    """The gateway (API key required, small limits) over one in-process worker."""
    with local_cluster(1) as (_, client):
        options = ReplicaOptions(model=str(chat_checkpoint), max_batch_size=8)
        llm = ServingClient(client, model=str(chat_checkpoint), replica=options, chat=True)
        llm.wait_for_replicas(1, timeout=60)
        settings = GatewaySettings(model_name=MODEL_NAME, api_key=API_KEY, max_body_bytes=64 * 1024,
                                   max_pending=6, max_n=4)
        server = GatewayServer(llm, settings, "127.0.0.1", 0)
        server.start_in_thread()
        yield server
        server.stop(timeout=30)
        llm.close()
