"""A request belongs to the client session that submitted it: another session can neither read
its events, cancel it, nor forge its tokens or its finish."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.cluster.serving_client import ServingClient

from .helpers import local_cluster
from .test_serving import _prompts, _reference


@pytest.mark.timeout(120)
def test_a_second_client_cannot_poll_cancel_or_forge(tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    prompt = _prompts(1)[0]
    with local_cluster(1, processes=True) as (_, client), \
            ServingClient(client, model=str(checkpoint), chat=False) as owner:
        future = owner.submit(prompt, max_new_tokens=60, ignore_eos=True)
        victim, session = future.request_id, owner._id  # noqa: SLF001 - what an attacker would guess
        rpc = client.scheduler
        with pytest.raises(Exception, match="belongs to another session"):
            client.sync(rpc.elastic_llm_poll, client=session, token="guess", cursor=0, timeout=0.1)
        with pytest.raises(Exception, match="token are required"):
            client.sync(rpc.elastic_llm_poll, client=session, cursor=0, timeout=0.1)
        with pytest.raises(Exception, match="belongs to another session"):
            client.sync(rpc.elastic_llm_cancel, client=session, token="guess", request_ids=[victim])
        # a session of its own may call cancel, but another session's request is not its to cancel
        assert client.sync(rpc.elastic_llm_cancel, client="intruder", token="t", request_ids=[victim]) == 0
        # commits on a client's stream are refused: the finish below must not reach the owner
        forged = {"replica": "r0", "loop": {"iterations": 1, "busy_s": 0.0, "overhead_s": 0.0, "period_s": 0.0,
                                            "prefix_tokens_reused": 0},
                  "tokens": [], "finished": [[victim, "stop", "FORGED", [1]]], "failed": []}
        client._send_to_scheduler({"op": "elastic_llm_commit", "commit": forged})  # noqa: SLF001
        result = future.result(timeout=60)
        assert result.text != "FORGED" and result.token_ids == _reference(checkpoint, [prompt], 60)[0]
        assert owner.status()["commits_refused"] >= 1
