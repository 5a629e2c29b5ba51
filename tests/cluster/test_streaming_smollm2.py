"""Streaming on the cluster with the real SmolLM2: the streamed pieces join to the final text."""

from __future__ import annotations

from typing import Any

import pytest

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.cluster.serving_client import ServingClient

from .helpers import local_cluster, wait_for

QUESTION = "What is the capital of France?"


@pytest.mark.smollm2
@pytest.mark.timeout(240)
def test_stream_yields_the_final_text(smollm2: Any) -> None:
    expected = LLMEngine(smollm2).generate([QUESTION], SamplingParams(max_new_tokens=40), chat=True)[0]
    with local_cluster(1, processes=True) as (_, client):
        llm = ServingClient(client)
        wait_for(lambda: llm.status()["replicas"][0]["state"] == "ready", timeout=180)
        pieces = list(llm.stream(QUESTION, max_new_tokens=40))
        final = llm.submit(QUESTION, max_new_tokens=40).result(timeout=120)
        llm.close()
    assert len(pieces) > 3, "text must arrive piece by piece"
    assert "".join(pieces) == final.text == expected.text
    assert "Paris" in final.text
