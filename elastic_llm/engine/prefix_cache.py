"""Prefix caching: keys and values of prompt prefixes already computed, reused by later requests.

Chat requests share long prefixes (the system prompt and the chat template's framing). Under
causal attention a position's keys and values depend only on the tokens up to it, so a request
whose prompt starts with a cached prefix copies that KV instead of computing it again.

Prompts are cut into blocks of `block_size` tokens. Block k of a prompt is stored under the key of
(block k-1's key, block k's tokens) (`scheduling.affinity.chain_key`, which the controller's
prefix-affinity routing computes too), and every entry keeps its parent key and its tokens, so a
lookup walks the chain from the first block, verifies each entry exactly and stops at the first
miss: a block is only ever found through the exact token sequence before it. Blocks are evicted
least recently used once their bytes pass the budget, a chain's later blocks before its earlier
ones. Each request gets its own copy of the matched KV, so exporting, swapping and migrating a
request work as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elastic_llm.scheduling.affinity import BLOCK_SIZE, chain_key

#: Reads positions [start, end) of a request's KV as fresh tensors (the cache keeps them):
#: (keys, values), each [layers, kv_heads, n, head_dim].
ReadKV = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PrefixBlock:
    """One cached block: its tokens, the key of the block before it, and its KV."""

    parent: int | None  #: key of the previous block (None: the prompt's first block)
    tokens: tuple[int, ...]  #: the block's tokens
    keys: torch.Tensor  #: [layers, kv_heads, block_size, head_dim]
    values: torch.Tensor  #: same shape as `keys`

    @property
    def nbytes(self) -> int:
        """Bytes of the block's keys and values."""
        return 2 * self.keys.numel() * self.keys.element_size()


class PrefixCache:
    """Block-hashed store of prefix KV under a byte budget (least recently used evicted first).

    Args:
        budget_bytes: most bytes of keys and values kept (> 0).
        block_size: tokens per block; prefixes are matched in whole blocks.
    """

    def __init__(self, budget_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        if budget_bytes <= 0 or block_size <= 0:
            raise ValueError("budget_bytes and block_size must be > 0")
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self._blocks: OrderedDict[int, PrefixBlock] = OrderedDict()
        self.nbytes = 0  #: bytes held now
        self.tokens_matched = 0  #: tokens handed out by `match` so far

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, tokens: Sequence[int], limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """KV of the longest cached whole-block prefix of ``tokens[:limit]``.

        Returns (keys, values), each ``[layers, kv_heads, n, head_dim]`` with n a multiple of the
        block size, or None when not even the first block is cached.
        """
        chain = self._walk(tokens[: max(0, limit)])
        if not chain:
            return None
        self._touch(chain)
        blocks = [self._blocks[key] for key in chain]
        self.tokens_matched += len(blocks) * self.block_size
        return (torch.cat([b.keys for b in blocks], dim=2), torch.cat([b.values for b in blocks], dim=2))

    def insert(self, tokens: Sequence[int], read: ReadKV) -> int:
        """Store the whole blocks of `tokens` not cached yet, reading their KV with `read`.

        `tokens` must be the exact tokens whose KV `read` returns, from position 0. Returns the
        blocks added.
        """
        size = self.block_size
        chain = self._walk(tokens)
        parent = chain[-1] if chain else None
        added = 0
        for start in range(len(chain) * size, len(tokens) - size + 1, size):
            block = tuple(tokens[start:start + size])
            key = chain_key(parent, block)
            if key in self._blocks:  # another chain's block under the same hash: stop here
                break
            keys, values = read(start, start + size)
            entry = PrefixBlock(parent, block, keys, values)
            if entry.nbytes > self.budget_bytes:
                break
            self._blocks[key] = entry
            self.nbytes += entry.nbytes
            chain.append(key)
            parent = key
            added += 1
        self._touch(chain)
        self._evict()
        return added

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()
        self.nbytes = 0

    def _walk(self, tokens: Sequence[int]) -> list[int]:
        """Keys of the cached blocks that spell out a prefix of `tokens`, first block first."""
        size = self.block_size
        chain: list[int] = []
        parent: int | None = None
        for start in range(0, len(tokens) - size + 1, size):
            block = tuple(tokens[start:start + size])
            key = chain_key(parent, block)
            entry = self._blocks.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block:
                break
            chain.append(key)
            parent = key
        return chain

    def _touch(self, chain: list[int]) -> None:
        """Mark a chain used, its first block most recently, so later blocks are evicted first."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self._blocks:
            _, entry = self._blocks.popitem(last=False)
            self.nbytes -= entry.nbytes
