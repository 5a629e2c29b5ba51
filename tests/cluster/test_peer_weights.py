"""A deferred replica builds from the weights a peer pushed, or from the checkpoint when they are incomplete."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from elastic_llm.cluster.replica_actor import ReplicaActor, ReplicaOptions
from elastic_llm.model.loader import load_model

from .helpers import local_cluster


@pytest.mark.timeout(120)
def test_complete_peer_weights_are_used_and_incomplete_ones_fall_back_to_the_checkpoint(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_checkpoint("llama-gqa-untied")
    tensors = load_model(path).network.tensors()
    partial = dict(list(tensors.items())[:3])  # as if the peer died mid-push
    options = ReplicaOptions(model=str(path))
    with local_cluster(1, processes=True) as (_, client):
        infos = {}
        for name, received in (("complete", tensors), ("partial", partial)):
            actor = client.submit(ReplicaActor, name, options, (), None, True, actor=True, pure=False).result()
            assert actor.receive_weights(received).result() == len(received)
            actor.build().result()
            infos[name] = actor.wait_ready().result()
            actor.stop().result()
    assert infos["complete"].weights == "peer"
    sent = sum(t.numel() * t.element_size() for t in tensors.values())
    assert infos["complete"].weight_bytes_from_peer == sent
    assert infos["partial"].weights == "checkpoint" and infos["partial"].weight_bytes_from_peer == 0
