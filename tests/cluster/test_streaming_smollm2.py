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
        # the second ask of the same chat prompt copied its cached prefix KV (whole blocks of 8)
        reused = llm.status()["prefix_tokens_reused"]
        llm.close()
    assert len(pieces) > 3, "text must arrive piece by piece"
    assert "".join(pieces) == final.text == expected.text
    assert "Paris" in final.text
    assert reused >= 24, reused


@pytest.mark.smollm2
@pytest.mark.timeout(300)
def test_quickstart_demo_migrates_and_summarises(smollm2: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from elastic_llm.cli import main

    assert main(["demo", "--max-new-tokens", "40", "--grace", "5"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "[spot] spot-3 joined" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary: 4 requests finished") and "0 tokens recomputed" in summary
    assert "MiB of weights from peers" in summary and "prompt tokens reused" in summary
