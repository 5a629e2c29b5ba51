"""Checking a profile against the engine: the cost model's decode step vs `LLMEngine.step()`.

Two predictions per batch size, both the cost model's decode step at P = M = 1 (``L`` layers +
embedding/head, no overhead factor):

* from the profile as written (measured minutes earlier, possibly under other load), and
* from one layer and the embedding/head timed again, round-robin with the engine's steps, so that
  both sides see the same load: this isolates the composition error (one layer timed alone, times
  ``L``, plus the head, against a whole engine step with its scheduling and sampling).

Imports the engine, so it is loaded only when a comparison is asked for.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from elastic_llm.engine import LLMEngine
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import CostModel
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import Phase
from elastic_llm.profiling.compute import (
    forward_call,
    head_network,
    layer_network,
    open_checkpoint,
    rank_shard,
)
from elastic_llm.profiling.result import EngineComparison
from elastic_llm.profiling.timing import CacheFlusher, interleaved_medians, torch_threads
from elastic_llm.sampling import SamplingParams
from elastic_llm.scheduling import BatchLimits


def compare_decode_step(model: str | os.PathLike[str], profile: MeasuredProfile,
                        batches: Sequence[int], context_len: int, steps: int = 24,
                        threads: int = 1, flush_cache: bool = True,
                        progress: Callable[[str], None] | None = None,
                        ) -> tuple[EngineComparison, ...]:
    """For each batch size, the predicted decode steps (see the module) against the median of
    ``steps`` `LLMEngine.step()` calls decoding that many requests whose prompts are
    ``context_len`` random tokens. One engine per batch size, all sharing the loaded weights;
    engine steps, layer and head calls are timed round-robin after one untimed round, the layer
    and head calls after a cache flush when ``flush_cache`` (as the profile was measured)."""
    loaded = load_model(model, load_tokenizer=False)
    checkpoint = open_checkpoint(model)
    shard = rank_shard(loaded.spec, 1)
    layer, head = layer_network(checkpoint, 0, shard), head_network(checkpoint, shard)
    with torch_threads(threads):
        calls: dict[tuple[str, int], Callable[[], object]] = {}
        for b in batches:
            calls["engine", b] = _decoding_engine(loaded, b, context_len, steps + 3).step
            calls["layer", b] = forward_call(layer, b, 1, context_len)
            calls["head", b] = forward_call(head, b, 1, context_len)
        flusher = CacheFlusher() if flush_cache else None

        def before(key: tuple[str, int]) -> None:
            if flusher is not None and key[0] != "engine":
                flusher()

        times = interleaved_medians(calls, steps, warmup=1, before=before)
    now = _with_decode_times(profile, {b: times["layer", b] for b in batches},
                             {b: times["head", b] for b in batches})
    workload = Workload(input_len=context_len, output_len=steps)
    written, same_time = (CostModel(loaded.spec, p, workload, overhead=1.0) for p in (profile, now))
    out = []
    for b in batches:
        config = ParallelConfig(1, 1, 1, b)
        check = EngineComparison(b, context_len, written.phase(config, Phase.DECODE).total,
                                 times["engine", b],
                                 same_time.phase(config, Phase.DECODE).total)
        out.append(check)
        if progress is not None:
            progress(f"engine decode step b={b}: {check.measured * 1e3:.2f} ms; predicted "
                     f"{check.predicted * 1e3:.2f} ms from the profile, "
                     f"{check.predicted_same_time * 1e3:.2f} ms from timings taken alongside")
    return tuple(out)


def _with_decode_times(profile: MeasuredProfile, layer: Mapping[int, float],
                       head: Mapping[int, float]) -> MeasuredProfile:
    """``profile`` with its M=1 decode layer and head rows replaced."""
    data = copy.deepcopy(profile.to_dict())
    data["layer"]["decode"]["1"] = {str(b): s for b, s in layer.items()}
    data.setdefault("head", {}).setdefault("decode", {})["1"] = {str(b): s for b, s in head.items()}
    return MeasuredProfile.from_json(data)


def _decoding_engine(loaded: LoadedModel, batch: int, context_len: int,
                     new_tokens: int) -> LLMEngine:
    """An engine whose ``batch`` requests (``context_len`` random prompt tokens each, EOS ignored)
    have all been prefilled, so that every further step decodes one token per request."""
    engine = LLMEngine(loaded, limits=BatchLimits(max_batch_size=batch,
                                                  max_batch_tokens=batch * context_len))
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(loaded.spec.vocab_size, (context_len,), generator=generator).tolist()
        engine.add_request(f"check-{i}", ids, params)
    prefilled: set[str] = set()
    while len(prefilled) < batch:  # the prompts, however the scheduler chunks them
        prefilled.update(output.request_id for output in engine.step())
    return engine
