"""The executor contract: what an engine needs from whatever runs the network and holds the KV.

`LLMEngine` owns requests, tokens, sampling and the scheduler; an *executor* owns the network and
every request's KV cache, keyed by request id. `LocalExecutor` runs the whole model in this
process; the sharded replica runs P x M worker processes behind the same contract. The engine
never touches a KV tensor except through `export_kv` / `import_kv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from elastic_llm.model.kv_cache import KVState


@dataclass(frozen=True)
class StepWork:
    """One request's share of a forward pass."""

    request_id: str  #: the request (its KV cache is found by this id)
    token_ids: tuple[int, ...]  #: new tokens whose KV this pass computes (prefill chunk or 1)
    start_position: int  #: position of `token_ids[0]`; equals the tokens already in its KV cache
    sample: bool  #: whether the next-token logits after the last of `token_ids` are wanted


class Executor(Protocol):
    """Runs forward passes over flat batches and keeps each request's KV cache."""

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token of one request occupies in this executor (all layers it holds)."""

    def execute(self, works: Sequence[StepWork]) -> torch.Tensor:
        """Compute `works` in one pass; logits ``[n, vocab]`` (float32, CPU or device) for the works
        with ``sample=True``, in order. Each request's KV cache grows by its `token_ids`."""

    def kv_length(self, request_id: str) -> int:
        """Positions cached for `request_id` (0 if none)."""

    def release(self, request_id: str) -> None:
        """Free a request's KV (device and host). Unknown ids are ignored."""

    def export_kv(self, request_id: str) -> KVState | None:
        """A copy of the request's whole KV (all layers, all KV heads) on CPU; None if none."""

    def import_kv(self, request_id: str, state: KVState) -> None:
        """Adopt `state` (all layers, all KV heads) as the request's KV cache."""


class SwappingExecutor(Executor, Protocol):
    """An executor that can also move KV caches between device and host memory."""

    def swap_out(self, request_ids: Sequence[str]) -> None:
        """Move these requests' KV to host memory (device memory is released at once)."""

    def swap_in(self, request_ids: Sequence[str]) -> None:
        """Bring these requests' KV back to device memory; returns once it is usable."""

    def prefetch(self, request_ids: Sequence[str]) -> None:
        """Start bringing these requests' KV back in the background (overlapped with compute)."""

    def on_host(self) -> frozenset[str]:
        """Requests whose KV is in host memory now (a prefetch in flight counts as on device)."""


class PrefixCachingExecutor(Executor, Protocol):
    """An executor that can also reuse the KV of prompt prefixes other requests computed."""

    def reuse_prefix(self, request_id: str, tokens: Sequence[int], limit: int) -> int:
        """Fill a request that holds no KV with cached KV of a prefix of ``tokens[:limit]``;
        returns the positions filled (0 if none)."""

    def remember_prefix(self, request_id: str, tokens: Sequence[int]) -> None:
        """Keep the KV of `tokens`, the request's first tokens (computed), for later requests."""
