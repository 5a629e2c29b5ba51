"""Streams through the gateway survive churn: one replica's worker gets a preemption notice (its
requests move with their KV), then the worker they moved to is SIGKILLed (they recompute from
the committed tokens on a newly acquired worker). Each client sees one uninterrupted stream with
the same text as a churn-free run and each token once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from elastic_llm import LLMEngine, SamplingParams

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from elastic_llm.model.loader import load_model
from elastic_llm.serve.server import GatewayServer
from elastic_llm.serve.settings import GatewaySettings
from tests.cluster.helpers import local_cluster

NEW_TOKENS = 160
PROMPTS = ("Tell me about the sea.", "Write a poem about rain.")


@pytest.fixture()
def fleet(chat_checkpoint: Path) -> Iterator[tuple[SpotEmulator, ServingClient, GatewayServer]]:
    """Two spot workers with ready replicas, paced to 50 ms per iteration, behind the gateway."""
    with local_cluster(0, processes=True) as (cluster, client):
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=2.0, memory_bytes=2**30)
        for name in "ab":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        options = ReplicaOptions(model=str(chat_checkpoint), max_batch_size=4, min_step_seconds=0.05)
        llm = ServingClient(client, model=str(chat_checkpoint), replica=options, migration_margin_s=1.0)
        llm.wait_for_replicas(2, timeout=120)
        server = GatewayServer(llm, GatewaySettings(model_name="tiny-chat"), "127.0.0.1", 0)
        server.start_in_thread()
        yield emulator, llm, server
        server.stop(timeout=30)
        llm.close()


def _stream(api: openai.OpenAI, prompt: str, started: threading.Event | None = None) -> tuple[list[str], int]:
    """The text pieces of one greedy stream and the completion tokens its usage reports."""
    pieces, usage = [], -1
    for chunk in api.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=NEW_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if started is not None and len(pieces) >= 3:
                started.set()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return pieces, usage


@pytest.mark.timeout(240)
def test_streams_survive_a_notice_and_a_sigkill(
        fleet: tuple[SpotEmulator, ServingClient, GatewayServer], chat_checkpoint: Path) -> None:
    checkpoint = chat_checkpoint
    emulator, llm, server = fleet
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    streams: dict[int, tuple[list[str], int]] = {}
    started = [threading.Event() for _ in PROMPTS]
    readers = [threading.Thread(target=lambda i=i: streams.__setitem__(i, _stream(api, PROMPTS[i], started[i])))
               for i in range(len(PROMPTS))]  # one stream on each replica (least outstanding work)
    for reader in readers:
        reader.start()
    assert all(event.wait(60) for event in started)
    emulator.preempt("a", notice=True)   # notice, 2 s grace: a's requests move to b with their KV
    emulator.preempt("b", notice=False)  # SIGKILL: they recompute from their committed tokens ...
    emulator.acquire("c", market="spot", price_per_hour=1.9)  # ... on c
    for reader in readers:
        reader.join(timeout=150)
    assert not any(reader.is_alive() for reader in readers)
    results = [streams[i] for i in range(len(PROMPTS))]
    engine = LLMEngine(load_model(checkpoint))  # the churn-free run, in this process
    reference = [engine.generate([llm.tokenizer.chat_messages_ids([("user", prompt)])],
                                 SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0].text
                 for prompt in PROMPTS]

    for (pieces, usage), text in zip(results, reference, strict=True):
        assert "".join(pieces) == text  # the same text, nothing repeated or missing
        assert usage == NEW_TOKENS
    status = llm.status()
    assert status["running"] == 0 and status["failed"] == 0
    assert [n["migrated"] for n in status["notices"]] and sum(n["migrated"] for n in status["notices"]) > 0
    assert status["tokens_recomputed"] > 0, "the SIGKILL hit no running stream"
