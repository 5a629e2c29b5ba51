"""FastServe on the cluster: a replica actor under skip-join MLFQ with a tight device KV budget
preempts and swaps KV, and still produces the greedy tokens of a single-process FCFS engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.cluster.replica_actor import ReplicaActor, ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.model.loader import load_model
from elastic_llm.scheduling import LinearPrefillPredictor, MLFQConfig, ResidencyConfig

from .helpers import local_cluster

BUDGET_TOKENS = 110  # device KV budget: about two requests' worth while a batch holds three


def _workload(n: int = 12) -> list[tuple[list[int], int]]:
    """(prompt, max_new_tokens) pairs: prompts of 2-29 tokens, 4-29 new tokens each."""
    generator = torch.Generator().manual_seed(11)
    items = []
    for _ in range(n):
        length = int(torch.randint(2, 30, (1,), generator=generator))
        prompt = torch.randint(1, 320, (length,), generator=generator).tolist()
        items.append((prompt, int(torch.randint(4, 30, (1,), generator=generator))))
    return items


def _actor_stats(dask_worker: Any) -> list[dict[str, Any]]:
    """Runs on the worker: `stats()` of every replica actor it holds."""
    return [actor.stats() for actor in dask_worker.state.actors.values() if isinstance(actor, ReplicaActor)]


@pytest.mark.timeout(120)
def test_skip_join_replica_with_a_kv_budget_swaps_and_matches_fcfs(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    workload = _workload()
    reference_engine = LLMEngine(load_model(checkpoint))  # FCFS, one process, KV always resident
    reference = [c.token_ids for c in reference_engine.generate(
        [prompt for prompt, _ in workload],
        [SamplingParams(max_new_tokens=n, ignore_eos=True) for _, n in workload])]
    budget = BUDGET_TOKENS * reference_engine.executor.kv_bytes_per_token
    options = ReplicaOptions(
        model=str(checkpoint), max_batch_size=3, max_batch_tokens=64, scheduler="skip-join",
        # quanta of a few tiny-model iterations, prompts joining levels 0-2: requests take turns
        mlfq=MLFQConfig(base_quantum_s=0.002, starvation_alpha_s=1.0),
        prefill_predictor=LinearPrefillPredictor(0.001, 0.0002),
        kv_residency=ResidencyConfig(device_budget_bytes=budget, mode="swap"))
    with local_cluster(1, processes=True) as (_, client):
        llm = ServingClient(client, model=str(checkpoint), replica=options, chat=False)
        llm.wait_for_replicas(1, timeout=60)
        futures = [llm.submit(prompt, max_new_tokens=n, ignore_eos=True) for prompt, n in workload]
        results = [f.result(timeout=60) for f in futures]
        status = llm.status()
        [actor_stats] = [s for per_worker in client.run(_actor_stats).values() for s in per_worker]
        llm.close()

    assert [r.token_ids for r in results] == reference
    [replica] = status["replicas"]
    counters = replica["scheduling"]  # committed with every iteration, per replica
    assert counters["preemptions"] > 0, counters
    assert counters["bytes_swapped_out"] > 0 and counters["bytes_swapped_in"] > 0, counters
    assert counters["tokens_dropped"] == 0  # swap mode keeps every computed token
    # the actor's own view: the engine runs real skip-join, with the same counters
    assert actor_stats["scheduler"] == "skip-join" and actor_stats["error"] is None
    assert actor_stats["scheduling"] == counters
