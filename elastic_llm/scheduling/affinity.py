"""Prefix-affinity routing: send a request to the replica whose prefix cache likely holds its start.

Each engine keeps the KV of prompts (and of finished requests' answers) in blocks keyed by a hash
chain (`chain_key`), so a follow-up turn of a conversation reuses everything before its new
message, but only on the replica that served the earlier turn. The controller mirrors which block
keys each replica has seen (`PrefixAffinity.observe`) and, among the replicas that can take a
request, prefers the one holding the longest prefix of it, as long as the extra queued work there
is no more than the prefill it saves (`choose`). This is an estimate: a replica may have evicted
blocks meanwhile, which only costs the prefill the engine would have done anyway.

Pure policy: no torch, no dask, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

BLOCK_SIZE = 8  #: tokens per prefix-cache block (the engine's `PrefixCache` default)


def chain_key(parent: int | None, block: tuple[int, ...]) -> int:
    """Key of a block of tokens behind the block keyed `parent` (None: the first block).

    Python hashes tuples of ints the same way in every process (no hash randomisation for ints),
    so the controller and the replicas compute the same keys.
    """
    return hash((parent, block))


def block_keys(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Chain keys of the whole blocks of `tokens`, first block first."""
    keys: list[int] = []
    parent: int | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_key(parent, tuple(tokens[start:start + block_size]))
        keys.append(parent)
    return keys


def common_blocks(keys: Sequence[int], other: Sequence[int]) -> int:
    """How many leading blocks two `block_keys` lists share (chained keys: equal means same prefix)."""
    return next((i for i, (a, b) in enumerate(zip(keys, other)) if a != b), min(len(keys), len(other)))


class PrefixAffinity:
    """Which prefix blocks each replica has seen, and the routing choice that follows.

    Args:
        block_size: tokens per block (the engines' prefix-cache block size).
        max_keys_per_replica: block keys remembered per replica (least recently seen dropped).
    """

    def __init__(self, block_size: int = BLOCK_SIZE, max_keys_per_replica: int = 8192) -> None:
        if block_size < 1 or max_keys_per_replica < 1:
            raise ValueError("block_size and max_keys_per_replica must be >= 1")
        self.block_size = block_size
        self.max_keys = max_keys_per_replica
        self._seen: dict[str, OrderedDict[int, None]] = {}

    def observe(self, replica: str, tokens: Sequence[int]) -> None:
        """`replica` computed the KV of `tokens` (a prompt, or a prompt and its answer)."""
        seen = self._seen.setdefault(replica, OrderedDict())
        for key in block_keys(tokens, self.block_size):
            seen[key] = None
            seen.move_to_end(key)
        while len(seen) > self.max_keys:
            seen.popitem(last=False)

    def forget(self, replica: str) -> None:
        """The replica is gone (its cache with it)."""
        self._seen.pop(replica, None)

    def retain(self, replicas: Sequence[str] | Mapping[str, object]) -> None:
        """Forget every replica not in `replicas`."""
        for replica in set(self._seen) - set(replicas):
            self.forget(replica)

    def matched_tokens(self, replica: str, tokens: Sequence[int]) -> int:
        """Tokens at the start of `tokens` whose blocks `replica` has seen."""
        return self._matched(replica, block_keys(tokens, self.block_size))

    def _matched(self, replica: str, keys: list[int]) -> int:
        seen = self._seen.get(replica, {})
        blocks = next((i for i, key in enumerate(keys) if key not in seen), len(keys))
        return blocks * self.block_size

    def choose(self, tokens: Sequence[int], load: Mapping[str, int]) -> str:
        """The replica for a request of `tokens`, given each candidate's queued work in tokens.

        The least loaded replica, unless another holds a longer prefix of `tokens` and its extra
        queued work is at most the prefix tokens it would not have to compute.
        """
        if not load:
            raise ValueError("no replica to choose from")
        least = min(load, key=lambda r: (load[r], r))
        keys = block_keys(tokens, self.block_size)
        best, best_matched = least, self._matched(least, keys)
        for replica in sorted(load):
            matched = self._matched(replica, keys)
            if matched > best_matched and load[replica] - load[least] <= matched:
                best, best_matched = replica, matched
        return best
