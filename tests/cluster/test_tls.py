"""Serving on a cluster whose every Dask connection must be TLS (generated certificates)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.cluster.serving_client import ServingClient

from .helpers import local_cluster
from .test_serving import _prompts, _reference


@pytest.mark.timeout(150)
def test_serving_works_with_required_encryption(tiny_checkpoint: Callable[[str], Path]) -> None:
    from distributed.security import Security

    checkpoint = tiny_checkpoint("llama-gqa-untied")
    security = Security.temporary()  # a fresh CA and certificate, require_encryption=True
    assert security.require_encryption
    prompts = _prompts(2)
    with local_cluster(1, processes=True, security=security, protocol="tls") as (cluster, client):
        assert cluster.scheduler_address.startswith("tls://")
        with ServingClient(client, model=str(checkpoint), chat=False) as llm:
            results = [f.result(timeout=90) for f in llm.map(prompts, max_new_tokens=12, ignore_eos=True)]
            assert llm.status()["finished"] == 2
    assert [r.token_ids for r in results] == _reference(checkpoint, prompts, 12)
