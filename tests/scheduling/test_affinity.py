"""Prefix-affinity routing: block keys shared with the engine's prefix cache, and the routing rule."""

from __future__ import annotations

import pytest
import torch

from elastic_llm.engine.prefix_cache import PrefixCache
from elastic_llm.scheduling.affinity import PrefixAffinity, block_keys


def test_block_keys_are_the_prefix_caches_own_keys() -> None:
    tokens = list(range(100, 125))  # three whole blocks of 8
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.insert(tokens, lambda a, b: (torch.zeros(1, 1, b - a, 1), torch.zeros(1, 1, b - a, 1)))
    assert set(cache._blocks) == set(block_keys(tokens))  # noqa: SLF001 - the same keys, in order
    assert block_keys(tokens[:7]) == [] and len(block_keys(tokens)) == 3
    assert block_keys([1] * 8 + [2] * 8)[1] != block_keys([3] * 8 + [2] * 8)[1]  # keys chain


def test_the_least_loaded_replica_unless_another_holds_enough_of_the_prefix() -> None:
    affinity = PrefixAffinity()
    conversation = list(range(40))
    affinity.observe("a", conversation)
    follow_up = conversation + [7, 7, 7]
    assert affinity.matched_tokens("a", follow_up) == 40 and affinity.matched_tokens("b", follow_up) == 0
    assert affinity.choose(follow_up, {"a": 0, "b": 0}) == "a"  # a tie: the cached prefix wins
    assert affinity.choose(follow_up, {"a": 30, "b": 0}) == "a"  # 30 more queued tokens < 40 saved
    assert affinity.choose(follow_up, {"a": 41, "b": 0}) == "b"  # more queued work than it saves
    assert affinity.choose([9] * 20, {"a": 0, "b": 5}) == "a"  # no prefix anywhere: least loaded
    affinity.retain(["b"])
    assert affinity.matched_tokens("a", follow_up) == 0
    with pytest.raises(ValueError):
        affinity.choose(follow_up, {})


def test_memory_per_replica_is_bounded_least_recently_seen_first() -> None:
    affinity = PrefixAffinity(block_size=2, max_keys_per_replica=3)
    affinity.observe("a", [1, 2, 3, 4])
    affinity.observe("a", [5, 6, 7, 8])  # 4 keys > 3: the oldest, the first block of [1, 2, 3, 4], goes
    assert affinity.matched_tokens("a", [1, 2, 3, 4]) == 0
    assert affinity.matched_tokens("a", [5, 6, 7, 8]) == 4
