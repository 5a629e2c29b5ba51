"""`LLMEngine`: one replica executing requests with iteration-level (continuous) batching.

Each `step()` reads like a sentence: the scheduler decides which requests compute how many tokens,
the network executes one flat batch, and the engine commits the sampled tokens.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from elastic_llm.engine.executor import Executor, StepWork, SwappingExecutor
from elastic_llm.engine.local_executor import LocalExecutor
from elastic_llm.engine.sampler import sample_tokens
from elastic_llm.engine.sequence import EngineRequest, RequestState
from elastic_llm.engine.stats import EngineCounters, EngineStats
from elastic_llm.errors import InvalidRequestError, UnknownRequestError
from elastic_llm.model.checkpoint import DEFAULT_MODEL
from elastic_llm.model.kv_cache import KVState
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.planning.config import ParallelConfig
from elastic_llm.request import Completion, RequestOutput
from elastic_llm.sampling import SamplingParams, validate_prompt_ids
from elastic_llm.scheduling import (
    FCFS,
    BatchLimits,
    IterationOutcome,
    KVResidencyPolicy,
    RequestScheduler,
    ResidencyConfig,
    SchedulerOutput,
    check_residency_scheduler,
    plan_iteration,
)
from elastic_llm.scheduling.affinity import block_keys, common_blocks

Prompt = str | Sequence[int]


class LLMEngine:
    """Serves many requests on one model replica in one process.

    Args:
        model: a `LoadedModel`, an embedded model name, a checkpoint directory or a GGUF file.
        scheduler: the request policy (default `FCFS`); same class the simulator runs.
        limits: batch size and per-iteration token budget. None: `BatchLimits()`, with at most
            `CPU_BATCH_TOKENS` tokens per iteration when the model runs on a CPU.
        residency: a device KV budget and what to do when it is short (swap to host or drop and
            recompute); needs a scheduler that estimates next scheduled times (`SkipJoinMLFQ`).
            None: every request's KV stays on the device.
        seed: seeds the choice of per-request seeds for sampled requests that gave none.
        clock: time source in seconds (monotonic); the scheduler gets its readings.
        executor: what runs the network and holds the KV (default: `LocalExecutor`, this process).
        parallel: run the replica as P pipeline stages x M tensor ranks in P*M local processes
            (`ParallelConfig` with D = 1, or a (P, M) pair); None or (1, 1): this process.
        prefix_cache_bytes: KV of prompt prefixes kept for reuse by later requests with the same
            prefix (e.g. a shared system prompt); 0 turns prefix caching off. Applies to the
            default in-process executor; None: its default (64 MiB).
    """

    #: a prompt sharing at least this many uncached prefix tokens with another prompt of the same
    #: pass waits one iteration for that prefix's KV instead of computing it again
    SHARED_PREFILL_MIN = 16

    #: default tokens per iteration on a CPU: prefill in chunks of this size. Bigger passes there
    #: allocate activations the C allocator maps fresh (and the kernel zeroes) on every pass:
    #: 32 chat prompts (1,274 tokens) prefilled 13-15% faster at 512 tokens per pass than at
    #: 1,024 or 2,048 (docs/benchmarks.md)
    CPU_BATCH_TOKENS = 512

    def __init__(self, model: LoadedModel | str | os.PathLike[str] = DEFAULT_MODEL, *,
                 scheduler: RequestScheduler | None = None, limits: BatchLimits | None = None,
                 residency: ResidencyConfig | None = None, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 executor: Executor | None = None,
                 parallel: ParallelConfig | tuple[int, int] | None = None,
                 prefix_cache_bytes: int | None = None) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.spec = self.model.spec
        self.tokenizer = self.model.tokenizer
        self.scheduler = scheduler if scheduler is not None else FCFS()
        self.limits = limits or self._default_limits()
        self.executor: Executor = (executor if executor is not None
                                   else self._make_executor(parallel, prefix_cache_bytes))
        self._residency = self._residency_policy(residency)
        self.clock = clock
        self._seeds = random.Random(seed)
        self._requests: dict[str, EngineRequest] = {}
        self._finished: dict[str, Completion] = {}
        self._counters = EngineCounters()
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer is not None:
            eos |= self.tokenizer.eos_token_ids
        self._eos_ids = frozenset(eos)

    def _default_limits(self) -> BatchLimits:
        weight = next(self.model.network.parameters(), None)
        if weight is not None and weight.device.type == "cpu":
            return BatchLimits(max_batch_tokens=self.CPU_BATCH_TOKENS)
        return BatchLimits()

    # ------------------------------------------------------------------ requests in and out
    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of `prompt` (text, optionally chat-formatted, or ids passed through)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids")
            return self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            return [int(t) for t in prompt.flatten().tolist()]
        return list(prompt)

    def add_request(self, request_id: str, prompt: Prompt,
                    params: SamplingParams | dict[str, object] | None = None, *,
                    chat: bool = False) -> None:
        """Queue a request; it joins the running batch at the next `step()`.

        Raises:
            InvalidRequestError: duplicate id, empty prompt, bad ids or parameters.
            PromptTooLongError: the prompt does not fit the context window.
        """
        params = SamplingParams.coerce(params)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode_prompt(prompt, chat)
        validate_prompt_ids(prompt_ids, self.spec.vocab_size, self.spec.max_position_embeddings)
        if params.seed is None and not params.greedy:
            params = params.with_seed(self._seeds.getrandbits(63))
        self._admit(self._new_request(request_id, prompt_ids, params, self.clock()))

    def resume_request(self, state: RequestState) -> None:
        """Continue a request exported from another engine, from its KV or by recompute."""
        if state.request_id in self._requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use")
        validate_prompt_ids(state.prompt_token_ids, self.spec.vocab_size, self.spec.max_position_embeddings)
        arrival = state.arrival_time if state.arrival_time is not None else self.clock()
        request = self._new_request(state.request_id, state.prompt_token_ids, state.params, arrival)
        first = state.first_token_time if state.arrival_time is not None else None  # same clock only
        request.restore_output(state.output_token_ids, first)
        if state.kv is not None:
            self._check_kv(state.kv, request.num_tokens)
            self.executor.import_kv(request.request_id, state.kv)
            request.num_computed = state.kv.length
        self._admit(request)

    def export_request(self, request_id: str, include_kv: bool = True) -> RequestState:
        """Remove an unfinished request and return its state (committed tokens, optionally KV)."""
        request = self._take(request_id)
        kv = self.executor.export_kv(request_id) if include_kv else None
        self.executor.release(request_id)
        return request.export(kv)

    def abort(self, request_id: str) -> Completion:
        """Cancel a request; returns its completion with finish_reason ABORT."""
        request = self._take(request_id)
        self.executor.release(request_id)
        request.finish_aborted()
        return request.completion(self.clock())

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        """Requests queued or running."""
        return len(self._requests)

    def pop_completion(self, request_id: str) -> Completion:
        """The completion of a finished request (removed from the engine's memory)."""
        try:
            return self._finished.pop(request_id)
        except KeyError:
            raise UnknownRequestError(f"no finished request {request_id!r}") from None

    # ------------------------------------------------------------------ one iteration
    def step(self) -> list[RequestOutput]:
        """Run one iteration: schedule, move KV as decided, execute one flat batch, commit tokens."""
        now = self.clock()
        decision = self._decide(now)
        if self._residency is None:
            decision = self._decide_after_prefix_reuse(decision, now)
        self._move_kv(decision)
        if not decision.scheduled:
            return []
        started = self.clock()
        reused: dict[str, int] = {}
        works: list[StepWork] = []
        for scheduled in decision.scheduled:
            request = self._requests[scheduled.request_id]
            # with a device KV budget, cached prefixes are taken here, within the scheduled tokens
            reuse = reused[request.request_id] = (self._reuse_prefix(request, scheduled.num_tokens)
                                                  if self._residency is not None else 0)
            works.append(self._work(request, scheduled.num_tokens - reuse))
        deferred = self._shared_prefill_followers(works)
        works = [w for w in works if w.request_id not in deferred]
        for request_id in deferred:
            self._requests[request_id].prefill_deferred = True
        self._counters.prefills_deferred += len(deferred)
        logits = self.executor.execute(works)
        samplers = [self._requests[w.request_id] for w in works if w.sample]
        chosen = sample_tokens(logits, [r.params for r in samplers], [len(r.output_ids) for r in samplers])
        for work in works:
            request = self._requests[work.request_id]
            request.num_computed += len(work.token_ids)
            if work.start_position < len(request.prompt_ids) <= work.start_position + len(work.token_ids):
                self._offer_prefix(request.request_id, request.prompt_ids)  # its prompt is computed
        now = self.clock()
        outputs = [req.append(token, now) for req, token in zip(samplers, chosen, strict=True)]
        for output in outputs:
            if output.finished:
                self._retire(output.request_id, now)
        self._counters.record_iteration(works, len(decision.preempted), self._device_kv_bytes())
        self.scheduler.update(IterationOutcome(
            now=now, duration=now - started,
            computed={w.request_id: len(w.token_ids) + reused[w.request_id] for w in works},
            sampled=tuple(req.request_id for req in samplers)))
        return outputs

    def _decide(self, now: float) -> SchedulerOutput:
        """The scheduler's batch, with KV moves attached when a device KV budget is set."""
        if self._residency is None:
            return self.scheduler.schedule(now, self.limits)
        return plan_iteration(
            self.scheduler, self._residency, now=now, limits=self.limits,  # type: ignore[arg-type]
            kv_tokens={rid: self.executor.kv_length(rid) for rid in self._requests},
            kv_bytes_per_token=self.executor.kv_bytes_per_token,
            on_host=self.executor.on_host(),  # type: ignore[attr-defined]
        )

    def _move_kv(self, decision: SchedulerOutput) -> None:
        """Carry out a residency decision: swap out and drop, then swap in, then prefetch."""
        if not (decision.swap_out or decision.drop or decision.swap_in or decision.prefetch):
            return
        executor: SwappingExecutor = self.executor  # type: ignore[assignment]
        executor.swap_out(decision.swap_out)
        for request_id in decision.drop:
            request = self._requests[request_id]
            self._counters.tokens_dropped += request.num_computed
            executor.release(request_id)
            request.num_computed = 0
            self.scheduler.mark_kv_dropped(request_id, len(request.pending_tokens()))  # type: ignore[attr-defined]
        executor.swap_in(decision.swap_in)
        executor.prefetch(decision.prefetch)

    def _decide_after_prefix_reuse(self, decision: SchedulerOutput, now: float) -> SchedulerOutput:
        """Without a device KV budget: scheduled requests that have computed nothing take cached
        prefix KV first and the scheduler, told (`skip_cached`), decides again, until no newly
        scheduled request finds any. The token budget then goes to tokens that need computing:
        32 prompts sharing a system prompt start in one pass fewer."""
        tried: set[str] = set()
        while True:
            fresh = [self._requests[work.request_id] for work in decision.scheduled
                     if work.request_id not in tried and self._requests[work.request_id].num_computed == 0]
            skipped = False
            for request in fresh:
                tried.add(request.request_id)
                reused = self._reuse_prefix(request, len(request.pending_tokens()))
                if reused:
                    self.scheduler.skip_cached(request.request_id, reused)
                    skipped = True
            if not skipped:
                return decision
            decision = self._decide(now)

    def _reuse_prefix(self, request: EngineRequest, budget: int) -> int:
        """A request about to compute from position 0 takes cached prefix KV where the executor
        has some, leaving at least one token to compute; returns the positions reused.

        Without a device KV budget this runs before the scheduler's final decision, which then
        budgets only the tokens still to compute (`_decide_after_prefix_reuse`). With one, it runs
        on the scheduled batch and reuse stays within the scheduled tokens, so the KV held after
        the iteration is what the residency plan counted on."""
        reuse = getattr(self.executor, "reuse_prefix", None)
        if reuse is None or request.num_computed > 0:
            return 0
        pending = request.pending_tokens()
        limit = len(pending) if self._residency is None else min(budget, len(pending))
        reused = int(reuse(request.request_id, pending, limit - 1))
        request.num_computed = reused
        self._counters.prefix_tokens_reused += reused
        return reused

    def _shared_prefill_followers(self, works: Sequence[StepWork]) -> set[str]:
        """Prompts that would compute the same uncached prefix (at least `SHARED_PREFILL_MIN`
        tokens) in this pass as an earlier prompt of the pass, which computes its whole prompt
        now: they wait one iteration and then copy that prefix from the prefix cache. A prompt
        waits at most once (if the cache could not keep the prefix, it computes it next time)."""
        cache = getattr(self.executor, "prefixes", None)
        if cache is None:
            return set()
        leaders: dict[int, list[int]] = {}  # first block key -> the leader's block keys
        followers: set[str] = set()
        for work in works:
            if work.start_position != 0 or self._requests[work.request_id].prefill_deferred:
                continue  # continuing from cached or computed KV, or it waited once already
            keys = block_keys(work.token_ids, cache.block_size)
            if not keys:
                continue
            leader = leaders.get(keys[0])
            if leader is None:
                if work.sample:  # its whole prompt is computed now, so cached after this pass
                    leaders[keys[0]] = keys
                continue
            if common_blocks(keys, leader) * cache.block_size >= self.SHARED_PREFILL_MIN:
                followers.add(work.request_id)
        return followers

    def _offer_prefix(self, request_id: str, tokens: Sequence[int]) -> None:
        """Offer the KV of `tokens` (the request's first tokens, computed) to later requests."""
        remember = getattr(self.executor, "remember_prefix", None)
        if remember is not None:
            remember(request_id, tokens)

    @staticmethod
    def _work(request: EngineRequest, budget: int) -> StepWork:
        pending = request.pending_tokens()
        chunk = tuple(pending[:budget])
        return StepWork(request.request_id, chunk, request.num_computed, len(chunk) == len(pending))

    def _device_kv_bytes(self) -> int:
        measure = getattr(self.executor, "device_kv_bytes", None)
        return measure() if measure is not None else 0

    def stats(self) -> EngineStats:
        """Counters since the engine started (iterations, tokens, preemptions, swapping)."""
        return self._counters.snapshot(self.executor)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Iterable[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 chat: bool = False) -> list[Completion]:
        """Run `prompts` to completion together; completions come back in prompt order."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params] * len(prompts)
        else:
            per_prompt = list(params)
        ids = [f"generate-{id(prompts)}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, per_prompt, strict=True):
            self.add_request(request_id, prompt, p, chat=chat)
        while any(i in self._requests for i in ids):
            self.step()
        return [self.pop_completion(i) for i in ids]

    # ------------------------------------------------------------------ internals
    def _new_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                     arrival: float) -> EngineRequest:
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return EngineRequest(request_id, prompt_ids, params, arrival, self._eos_ids,
                             self.spec.max_position_embeddings, decode)

    def _make_executor(self, parallel: ParallelConfig | tuple[int, int] | None,
                       prefix_cache_bytes: int | None) -> Executor:
        config = self._parallel_config(parallel) if parallel is not None else None
        if config is None or (config.P, config.M) == (1, 1):
            if prefix_cache_bytes is None:
                prefix_cache_bytes = LocalExecutor.DEFAULT_PREFIX_CACHE_BYTES
            return LocalExecutor(self.model.network, self.spec, prefix_cache_bytes=prefix_cache_bytes)
        from elastic_llm.engine.replica.sharded_executor import ShardedExecutor

        return ShardedExecutor(self.model, config)

    def _parallel_config(self, parallel: ParallelConfig | tuple[int, int]) -> ParallelConfig:
        if isinstance(parallel, ParallelConfig):
            if parallel.D != 1:
                raise ValueError("one engine is one replica: ParallelConfig.D must be 1")
            return parallel
        pipeline, tensor = parallel
        return ParallelConfig(D=1, P=pipeline, M=tensor, B=self.limits.max_batch_size)

    def reconfigure(self, parallel: ParallelConfig | tuple[int, int], **options: object) -> object:
        """Switch the running replica to another (P, M) between iterations; in-flight requests keep
        their KV (moved by slice, nothing recomputed). `options` go to the executor's
        `reconfigure` (e.g. ``use_mapper``, ``progressive``, ``memory_bytes``). Returns its report."""
        reconfigure = getattr(self.executor, "reconfigure", None)
        if reconfigure is None:
            raise ValueError(f"{type(self.executor).__name__} cannot reconfigure: build the engine "
                             "with parallel=... to run a sharded replica")
        return reconfigure(self._parallel_config(parallel), **options)

    def close(self) -> None:
        """Release the executor's processes and threads."""
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    def _check_fits_budget(self, request: EngineRequest) -> None:
        """Refuse a request whose KV at its longest could never be resident (it would wait forever)."""
        if self._residency is None:
            return
        longest = min(len(request.prompt_ids) + request.params.max_new_tokens, self.spec.max_position_embeddings)
        need = longest * self.executor.kv_bytes_per_token
        budget = self._residency.config.device_budget_bytes
        if need > budget:
            raise InvalidRequestError(
                f"request {request.request_id!r} needs up to {need} bytes of KV ({longest} tokens), "
                f"more than the device KV budget of {budget} bytes: lower max_new_tokens or raise the budget")

    def _residency_policy(self, config: ResidencyConfig | None) -> KVResidencyPolicy | None:
        if config is None:
            return None
        check_residency_scheduler(self.scheduler, config)
        if config.mode == "swap" and not hasattr(self.executor, "swap_out"):
            raise ValueError(f"swap mode needs an executor that swaps; {type(self.executor).__name__} does not")
        return KVResidencyPolicy(config)

    def _admit(self, request: EngineRequest) -> None:
        self._check_fits_budget(request)
        self._requests[request.request_id] = request
        self.scheduler.note_prompt(request.request_id, request.prompt_ids)
        self.scheduler.add_request(request.request_id, len(request.pending_tokens()), self.clock())

    def _take(self, request_id: str) -> EngineRequest:
        request = self._requests.pop(request_id, None)
        if request is None:
            raise UnknownRequestError(f"no unfinished request {request_id!r}")
        self.scheduler.remove_request(request_id)
        return request

    def _retire(self, request_id: str, now: float) -> None:
        request = self._take(request_id)
        # a follow-up turn's prompt starts with this prompt and its answer: keep their KV too
        self._offer_prefix(request_id, [*request.prompt_ids, *request.output_ids])
        self.executor.release(request_id)
        self._finished[request_id] = request.completion(now)

    def _check_kv(self, kv: KVState, num_tokens: int) -> None:
        held = self.spec.num_kv_heads
        shape_ok = (kv.layer_start == 0 and len(kv.keys) == self.spec.num_layers
                    and all(k.shape == (held, kv.length, self.spec.head_dim) for k in kv.keys))
        if not shape_ok or not 0 < kv.length < num_tokens:
            raise InvalidRequestError(
                f"KV state does not fit this model or request (length {kv.length}, {num_tokens} tokens)"
            )
