"""The enactor's fire-and-forget calls never hang: an actor call that is never answered (Dask
leaves it unset when its worker dies) is given up after `QUIET_CALL_TIMEOUT_S`."""

from __future__ import annotations

import asyncio

import pytest

from elastic_llm.cluster import enactor


def test_a_call_that_never_answers_is_given_up_and_one_that_raises_is_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enactor, "QUIET_CALL_TIMEOUT_S", 0.05)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()  # as a call to a dead worker's actor
        began = loop.time()
        await enactor.Enactor._quiet(never)  # noqa: SLF001 - the helper itself
        waited = loop.time() - began

        async def raises() -> None:
            raise OSError("Unable to contact Actor's worker")

        await enactor.Enactor._quiet(raises())  # noqa: SLF001
        return waited

    waited = asyncio.run(asyncio.wait_for(scenario(), 5.0))
    assert 0.04 <= waited < 1.0


def test_capacity_requests_are_published_on_a_dask_event_topic() -> None:
    from distributed import Client, LocalCluster

    from elastic_llm.control import instructions as ins

    async def scenario() -> list[dict[str, object]]:
        async with LocalCluster(n_workers=0, processes=False, asynchronous=True, dashboard_address=None) as cluster, \
                Client(cluster, asynchronous=True) as client:
            carrier = enactor.Enactor(client, None, report=lambda event: None, notify=lambda clients: None)  # type: ignore[arg-type]
            carrier.carry_out(ins.AcquireCapacity(2, "on-demand"))
            carrier.carry_out(ins.ReleaseCapacity("tcp://127.0.0.1:1"))
            seen: list[dict[str, object]] = []
            for _ in range(100):  # what an autoscaler reads (or gets through `subscribe_topic`)
                seen = [msg for _, msg in await client.get_events(enactor.CAPACITY_TOPIC)]
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.05)
            assert list(carrier.capacity_requests) == seen
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 30.0))
    assert seen == [{"instruction": "AcquireCapacity", "count": 2, "market": "on-demand"},
                    {"instruction": "ReleaseCapacity", "worker": "tcp://127.0.0.1:1"}]
