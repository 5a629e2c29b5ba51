"""The migration planner's bookkeeping structures (see `planning.migration`'s "Cost" notes).

`_Queues` replays transfers on per-device full-duplex links, `_Gaps` caches the pieces a worker
lacks per pair of slice tuples, `_HolderIndex` indexes who holds which interval lazily, and
`_Senders` picks the least-loaded holder with a lazy heap. Internal to the planner.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Mapping

from elastic_llm.planning.slices import Part, Slice, subtract_interval

Key = tuple[int, Part, int]  #: Slice.key: (layer, part, batch)
Holding = tuple[tuple[Slice, ...], tuple[Slice, ...]]  #: (weight slices, KV slices) of a worker
Holder = tuple[int, int, list[str]]  #: (start, stop, workers holding exactly that interval)


class _Queues:
    """Per-device full-duplex link queues: when each device's sending and receiving side is free.
    The checkpoint (``src`` None) has no queue of its own."""

    def __init__(self) -> None:
        """Every queue free from time 0."""
        self.send_free: dict[str, float] = {}
        self.recv_free: dict[str, float] = {}

    def run(self, src: str | None, dst: str, seconds: float) -> float:
        """Queue a transfer of ``seconds`` from ``src`` to ``dst``; returns when it ends."""
        if src is None:
            end = self.recv_free.get(dst, 0.0) + seconds
        else:
            end = max(self.send_free.get(src, 0.0), self.recv_free.get(dst, 0.0)) + seconds
            self.send_free[src] = end
        self.recv_free[dst] = end
        return end


class _Gaps:
    """Per-call cache of the pieces of each slice of a tuple that another tuple leaves uncovered.

    Keyed by the identity of both tuples (the planners share one tuple per position shape, so
    workers moving alike share the answer); the tuples are kept alive with the answer so that no
    identity is reused while the cache lives. An uncovered whole slice is returned as itself.
    """

    def __init__(self) -> None:
        """An empty cache."""
        self._cache: dict[tuple[int, int], tuple[tuple[Slice, ...], tuple[Slice, ...],
                                                 list[tuple[Key, list[Slice]]]]] = {}

    def __call__(self, slices: tuple[Slice, ...],
                 cover: tuple[Slice, ...]) -> list[tuple[Key, list[Slice]]]:
        """[(key, pieces outside the same-key slice of ``cover``)] for each of ``slices``."""
        found = self._cache.get((id(slices), id(cover)))
        if found is None:
            by_key = {s.key: s for s in cover}
            out = []
            for s in slices:
                other = by_key.get(s.key)
                gaps = ([(s.start, s.stop)] if other is None
                        else subtract_interval(s.start, s.stop, other.start, other.stop))
                out.append((s.key, [s if (a, b) == (s.start, s.stop) else s.with_range(a, b)
                                    for a, b in gaps]))
            found = self._cache[(id(slices), id(cover))] = (slices, cover, out)
        return found[2]


class _HolderIndex:
    """Who holds what: {slice key: [(start, stop, holders)]} sorted by start, built lazily.

    Holders of one tuple object (one old (stage, rank) for weights) form one group, its names
    sorted; a key's entries with the same interval from several groups are merged into one sorted
    list, shared by every key with the same set of groups. Shard intervals of one key never partly
    overlap. Keys are indexed a batch at a time (weights are batch -1) and merged on first use, so
    the KV of batches nobody fetches is never indexed.
    """

    def __init__(self, held: Mapping[str, Holding]) -> None:
        """Group the holders of ``held`` by tuple and bucket the groups by batch."""
        groups: dict[int, tuple[tuple[Slice, ...], list[str]]] = {}
        for name, holding in held.items():
            for slices in holding:
                if slices:
                    groups.setdefault(id(slices), (slices, []))[1].append(name)
        self._by_batch: dict[int, list[tuple[tuple[Slice, ...], list[str]]]] = defaultdict(list)
        for slices, names in groups.values():
            names.sort()
            for batch in {s.batch for s in slices}:
                self._by_batch[batch].append((slices, names))
        self._raw: dict[Key, list[Holder]] = defaultdict(list)
        self._entries: dict[Key, list[Holder]] = {}
        self._shared: dict[tuple[int, ...], list[str]] = {}

    def entries(self, key: Key) -> list[Holder]:
        """The holders of ``key``'s intervals, sorted by interval."""
        if key not in self._entries:
            for slices, names in self._by_batch.pop(key[2], ()):  # index the batch once
                for s in slices:
                    if s.batch == key[2]:
                        self._raw[s.key].append((s.start, s.stop, names))
            entries = self._raw.pop(key, [])
            if len(entries) > 1:
                by_range: dict[tuple[int, int], list[list[str]]] = defaultdict(list)
                for start, stop, names in entries:
                    by_range[(start, stop)].append(names)
                entries = [(a, b, lists[0] if len(lists) == 1 else self._merged(lists))
                           for (a, b), lists in sorted(by_range.items())]
            self._entries[key] = entries
        return self._entries[key]

    def _merged(self, lists: list[list[str]]) -> list[str]:
        """One sorted list of the holders of several groups (e.g. a replicated part), shared by
        every key held by the same groups."""
        return self._shared.setdefault(tuple(sorted(map(id, lists))),
                                       sorted(n for names in lists for n in names))


class _Senders:
    """Picks the least-loaded holder: fewest bytes sent so far, the first such in list order,
    among the holders on the target's instance when ``instance_of`` is given and any is there.

    One lazy heap per holder list, entries (bytes sent when pushed, place in the list, name):
    bytes sent only grow, so a top entry whose count is still current is the list's minimum.
    Heaps and per-instance splits are keyed by the list's identity and keep the list alive.
    """

    def __init__(self, instance_of: Mapping[str, str] | None) -> None:
        """``instance_of``: each worker's instance (None: no preference for the same one)."""
        self.instance_of = instance_of
        self.sent: dict[str, int] = {}
        self._heaps: dict[int, tuple[list[str], list[tuple[int, int, str]]]] = {}
        self._local: dict[int, tuple[list[str], dict[str, list[str]]]] = {}

    def pick(self, holders: list[str], instance: str, nbytes: int) -> str:
        """The holder that sends ``nbytes`` to a worker on ``instance`` (and count them)."""
        if self.instance_of is not None:
            if id(holders) not in self._local:
                local: dict[str, list[str]] = defaultdict(list)
                for name in holders:
                    local[self.instance_of[name]].append(name)
                self._local[id(holders)] = (holders, local)
            holders = self._local[id(holders)][1].get(instance) or holders
        if id(holders) not in self._heaps:
            fresh = [(self.sent.get(n, 0), i, n) for i, n in enumerate(holders)]
            heapq.heapify(fresh)
            self._heaps[id(holders)] = (holders, fresh)
        heap = self._heaps[id(holders)][1]
        while True:
            count, place, name = heap[0]
            now = self.sent.get(name, 0)
            if count == now:
                break
            heapq.heapreplace(heap, (now, place, name))  # stale: another list's pick counted
        self.sent[name] = now + nbytes
        heapq.heapreplace(heap, (now + nbytes, place, name))
        return name
