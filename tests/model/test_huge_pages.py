"""Transparent huge pages for large CPU buffers: address arithmetic, and (where the kernel offers
THP) buffers that really end up on huge pages."""

from __future__ import annotations

import pytest
import torch

from elastic_llm.model import huge_pages
from elastic_llm.model.huge_pages import HUGE_PAGE, Region, new_ranges


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def _needs_thp() -> None:
    if not huge_pages.enabled():
        pytest.skip("transparent huge pages are off on this machine (or not Linux)")


def test_only_whole_aligned_huge_pages_inside_a_range_count() -> None:
    assert Region(1, HUGE_PAGE * 3 - 1).aligned() == Region(HUGE_PAGE, HUGE_PAGE * 2)
    assert Region(HUGE_PAGE, HUGE_PAGE * 2).aligned() == Region(HUGE_PAGE, HUGE_PAGE * 2)
    assert Region(1, HUGE_PAGE * 2 - 1).aligned() is None


def test_new_ranges_are_new_mappings_grown_tails_and_merged_neighbours() -> None:
    before = {100: 200, 300: 400}
    after = {100: 250, 50: 60, 280: 400, 500: 600}  # heap tail grown, new below, merged, new
    assert new_ranges(before, after) == [Region(50, 60), Region(200, 250), Region(280, 300), Region(500, 600)]
    assert new_ranges(before, before) == []


def test_memory_filled_inside_the_block_is_collapsed_into_huge_pages() -> None:
    _needs_thp()
    with huge_pages.backing_new_memory(background=False) as collapse:
        # 40 MiB, filled on 4 KiB pages: above glibc's largest mmap threshold (32 MiB), so always
        # a new mapping (a smaller block may reuse heap that earlier tests freed: nothing new)
        tensor = torch.ones(20 * HUGE_PAGE // 4)
    if collapse[0].wait() == 0:
        pytest.skip("MADV_COLLAPSE refused (Linux < 6.1, or no free 2 MiB pages just now)")
    assert _huge_bytes_at(tensor.data_ptr() + 10 * HUGE_PAGE) >= 4 * HUGE_PAGE
    assert bool((tensor == 1).all())  # collapsing kept the contents


def test_the_environment_turns_huge_pages_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTIC_LLM_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    with huge_pages.backing_new_memory() as collapse:
        torch.ones(8 * HUGE_PAGE // 4)
    assert collapse == []


def test_the_kv_pool_grows_on_small_pages() -> None:
    """Marked huge pages made each growth of the pool (a stall of the whole batch) up to 5x slower."""
    from elastic_llm.model.kv_cache import KVPool

    try:
        with open(huge_pages.THP_SETTING) as f:
            only_when_asked = "[madvise]" in f.read()
    except OSError:
        only_when_asked = False
    if not only_when_asked:  # ("always" would give huge pages to any large mapping)
        pytest.skip("THP is not in 'madvise' mode here")
    pool = KVPool(0, 30, 3, 64, torch.float32, torch.device("cpu"), slots=8, capacity=256)
    caches = [pool.allocate(10) for _ in range(9)]  # the ninth doubles the slots: 180 MiB
    assert pool.slots == 16 and len(caches) == 9
    storage = pool.kv(0)
    assert _huge_bytes_at(storage.data_ptr() + 4 * HUGE_PAGE) == 0
