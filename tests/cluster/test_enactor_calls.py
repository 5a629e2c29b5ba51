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
