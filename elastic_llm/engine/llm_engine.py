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

from elastic_llm.engine.sampler import sample_tokens
from elastic_llm.engine.sequence import EngineRequest, RequestState
from elastic_llm.errors import InvalidRequestError, UnknownRequestError
from elastic_llm.model.checkpoint import DEFAULT_MODEL
from elastic_llm.model.kv_cache import KVCache, KVState
from elastic_llm.model.layers import SequenceSlice
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.request import Completion, RequestOutput
from elastic_llm.sampling import SamplingParams, validate_prompt_ids
from elastic_llm.scheduling import FCFS, BatchLimits, IterationOutcome, RequestScheduler

Prompt = str | Sequence[int]


class LLMEngine:
    """Serves many requests on one model replica in one process.

    Args:
        model: a `LoadedModel`, an embedded model name, a checkpoint directory or a GGUF file.
        scheduler: the request policy (default `FCFS`); same class the simulator runs.
        limits: batch size and per-iteration token budget.
        seed: seeds the choice of per-request seeds for sampled requests that gave none.
        clock: time source in seconds (monotonic); the scheduler gets its readings.
    """

    def __init__(self, model: LoadedModel | str | os.PathLike[str] = DEFAULT_MODEL, *,
                 scheduler: RequestScheduler | None = None, limits: BatchLimits | None = None,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.spec = self.model.spec
        self.tokenizer = self.model.tokenizer
        self.scheduler = scheduler or FCFS()
        self.limits = limits or BatchLimits()
        self.clock = clock
        self._seeds = random.Random(seed)
        self._requests: dict[str, EngineRequest] = {}
        self._finished: dict[str, Completion] = {}
        self._device = next(self.model.network.parameters()).device
        self._dtype = next(self.model.network.parameters()).dtype
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer is not None:
            eos |= self.tokenizer.eos_token_ids
        self._eos_ids = frozenset(eos)

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
        request.restore_output(state.output_token_ids)
        if state.kv is not None:
            self._check_kv(state.kv, request.num_tokens)
            request.cache = KVCache.from_state(state.kv.to(self._device), self._device)
        self._admit(request)

    def export_request(self, request_id: str, include_kv: bool = True) -> RequestState:
        """Remove an unfinished request and return its state (committed tokens, optionally KV)."""
        request = self._take(request_id)
        return request.export(include_kv)

    def abort(self, request_id: str) -> Completion:
        """Cancel a request; returns its completion with finish_reason ABORT."""
        request = self._take(request_id)
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
        """Run one iteration: schedule, execute one flat batch, commit the sampled tokens."""
        decision = self.scheduler.schedule(self.clock(), self.limits)
        if not decision.scheduled:
            return []
        started = self.clock()
        batch = [(self._requests[w.request_id], w.num_tokens) for w in decision.scheduled]
        sampled = self._execute(batch)
        now = self.clock()
        outputs = [req.append(token, now) for req, token in sampled]
        for output in outputs:
            if output.finished:
                self._retire(output.request_id, now)
        self.scheduler.update(IterationOutcome(
            now=now, duration=now - started,
            computed={req.request_id: n for req, n in batch},
            sampled=tuple(req.request_id for req, _ in sampled)))
        return outputs

    def _execute(self, batch: list[tuple[EngineRequest, int]]) -> list[tuple[EngineRequest, int]]:
        """Forward the scheduled tokens; return (request, sampled token) for requests caught up."""
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SequenceSlice] = []
        logit_rows: list[int] = []
        samplers: list[EngineRequest] = []
        for request, budget in batch:
            pending = request.pending_tokens()
            chunk = pending[:budget]
            start = len(tokens)
            tokens.extend(chunk)
            positions.extend(range(request.num_computed, request.num_computed + len(chunk)))
            request.cache.reserve(len(chunk))
            seqs.append(SequenceSlice(start, len(chunk), request.cache))
            if len(chunk) == len(pending):
                logit_rows.append(len(tokens) - 1)
                samplers.append(request)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self._device)  # noqa: E731
        logits = self.model.network(as_tensor(tokens), as_tensor(positions), seqs, as_tensor(logit_rows))
        for seq in seqs:
            seq.cache.advance(seq.num_new)
        chosen = sample_tokens(logits, [r.params for r in samplers],
                               [len(r.output_ids) for r in samplers])
        return list(zip(samplers, chosen, strict=True))

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
        cache = KVCache(0, self.spec.num_layers, self.model.network.shard.num_kv_heads,
                        self.spec.head_dim, self._dtype, self._device,
                        capacity=len(prompt_ids) + min(params.max_new_tokens, 64))
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return EngineRequest(request_id, prompt_ids, params, cache, arrival, self._eos_ids,
                             self.spec.max_position_embeddings, decode)

    def _admit(self, request: EngineRequest) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add_request(request.request_id, len(request.pending_tokens()), self.clock())

    def _take(self, request_id: str) -> EngineRequest:
        request = self._requests.pop(request_id, None)
        if request is None:
            raise UnknownRequestError(f"no unfinished request {request_id!r}")
        self.scheduler.remove_request(request_id)
        return request

    def _retire(self, request_id: str, now: float) -> None:
        request = self._take(request_id)
        self._finished[request_id] = request.completion(now)

    def _check_kv(self, kv: KVState, num_tokens: int) -> None:
        held = self.model.network.shard.num_kv_heads
        shape_ok = (kv.layer_start == 0 and len(kv.keys) == self.spec.num_layers
                    and all(k.shape == (held, kv.length, self.spec.head_dim) for k in kv.keys))
        if not shape_ok or not 0 < kv.length < num_tokens:
            raise InvalidRequestError(
                f"KV state does not fit this model or request (length {kv.length}, {num_tokens} tokens)"
            )
