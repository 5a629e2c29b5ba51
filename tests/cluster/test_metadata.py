"""MetadataWatcher: parsing, probes against a fake metadata server, and notices reaching the
scheduler's NoticeBoard from a real LocalCluster worker."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from types import SimpleNamespace
from typing import Any

import pytest

from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.metadata import (
    MetadataWatcher,
    make_probe,
    parse_aws_instance_action,
    parse_azure_events,
    parse_gcp_preempted,
)
from elastic_llm.cluster.notices import NoticeBoard

from .helpers import FakeMetadataServer, local_cluster, wait_for

PROVIDERS = ("aws", "gcp", "azure")


# ---- parsing --------------------------------------------------------------------------------
def test_parse_aws_instance_action() -> None:
    body = json.dumps({"action": "terminate", "time": "2026-03-01T12:00:30Z"}).encode()
    assert parse_aws_instance_action(body) == 1772366430.0


def test_parse_gcp_preempted() -> None:
    assert parse_gcp_preempted(b"TRUE") and parse_gcp_preempted(b"true\n")
    assert not parse_gcp_preempted(b"FALSE")


def test_parse_azure_events_takes_the_earliest_preempt_only() -> None:
    body = json.dumps({"Events": [
        {"EventType": "Reboot", "NotBefore": "Sun, 01 Mar 2026 11:00:00 GMT"},
        {"EventType": "Preempt", "NotBefore": "Sun, 01 Mar 2026 12:00:30 GMT"},
        {"EventType": "Preempt", "NotBefore": "Sun, 01 Mar 2026 12:00:10 GMT"},
    ]}).encode()
    assert parse_azure_events(body, now=0.0) == 1772366410.0
    assert parse_azure_events(b'{"Events": [{"EventType": "Freeze", "NotBefore": ""}]}', now=5.0) is None
    assert parse_azure_events(b'{"Events": [{"EventType": "Preempt", "NotBefore": ""}]}', now=5.0,
                              grace_s=30.0) == 35.0
    assert parse_azure_events(b"", now=5.0) is None


def test_invalid_provider_is_refused() -> None:
    with pytest.raises(ClusterConfigError):
        MetadataWatcher("oracle")  # type: ignore[arg-type]
    with pytest.raises(ClusterConfigError):
        make_probe("ibm")  # type: ignore[arg-type]


# ---- probes against the fake server (no cluster) --------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_probe_reports_nothing_then_the_deadline(provider: str) -> None:
    deadline = float(math.floor(time.time()) + 100)
    with FakeMetadataServer(provider) as server:
        probe = make_probe(provider, base_url=server.url, grace_s=30.0)  # type: ignore[arg-type]
        assert probe(1000.0) is None
        server.announce(deadline)
        expected = 1000.0 + 30.0 if provider == "gcp" else deadline
        assert probe(1000.0) == expected
        assert probe(1005.0) == expected  # GCP: the deadline counts from the first sighting
        assert server.polls == 3


@pytest.mark.timeout(30)
def test_aws_probe_reuses_its_token_and_renews_it_when_refused() -> None:
    with FakeMetadataServer("aws") as server:
        probe = make_probe("aws", base_url=server.url)
        probe(0.0)
        probe(1.0)
        assert server.tokens_issued == 1
        server.revoke_token = True
        assert probe(2.0) is None
        assert server.tokens_issued == 2 and server.rejected_tokens == 1


@pytest.mark.timeout(30)
def test_probe_raises_oserror_on_server_errors() -> None:
    with FakeMetadataServer("gcp") as server:
        server.fail_next(1)
        with pytest.raises(OSError):
            make_probe("gcp", base_url=server.url)(0.0)


# ---- the watcher's loop (fake worker, real HTTP) --------------------------------------------
class _FakeScheduler:
    """The worker's view of the scheduler: its stream (notices) and the pending-notice handler."""

    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:  # the worker's batched stream
        assert message["op"] == "elastic_llm_worker_notice"
        self.notices.append(message["notice"])

    async def elastic_llm_notice_pending(self, worker: str) -> dict[str, float | None]:
        return {"deadline": min((n["deadline"] for n in self.notices if n["worker"] == worker), default=None)}


def _fake_worker() -> Any:
    scheduler = _FakeScheduler()
    return SimpleNamespace(address="tcp://10.0.0.7:1234", name="i-0abc", plugins={},
                           memory_manager=SimpleNamespace(memory_limit=2**30),
                           scheduler=scheduler, batched_stream=scheduler)


@pytest.mark.timeout(30)
def test_watcher_survives_network_errors_and_forwards_once(caplog: pytest.LogCaptureFixture) -> None:
    worker = _fake_worker()
    with FakeMetadataServer("aws") as server:
        server.fail_next(3)  # token PUT fails three times: logged, not raised
        server.announce(time.time() + 120)
        watcher = MetadataWatcher("aws", base_url=server.url, poll_interval_s=0.01)
        with caplog.at_level(logging.DEBUG, logger="elastic_llm.cluster.metadata"):
            notice = asyncio.run(asyncio.wait_for(watcher.watch(worker), 20))
    assert isinstance(notice, PreemptionNotice)
    assert notice.worker == worker.address and notice.instance_id == "i-0abc" and notice.source == "aws"
    assert worker.scheduler.notices == [notice.to_dict()]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreadable" in r.message]
    assert len(warnings) == 1  # one warning per failure streak, the rest at debug level


@pytest.mark.timeout(30)
def test_watcher_keeps_polling_an_unreachable_service() -> None:
    worker = _fake_worker()
    with FakeMetadataServer("gcp") as server:
        url = server.url
    watcher = MetadataWatcher("gcp", base_url=url, poll_interval_s=0.01, timeout_s=0.5)

    async def run_briefly() -> bool:
        task = asyncio.create_task(watcher.watch(worker))
        await asyncio.sleep(0.3)
        alive = not task.done()
        task.cancel()
        return alive

    assert asyncio.run(run_briefly())
    assert worker.scheduler.notices == []


# ---- end to end: worker plugin -> scheduler NoticeBoard --------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fake_notice_reaches_the_notice_board(provider: str) -> None:
    announced = float(math.floor(time.time()) + 90)
    with FakeMetadataServer(provider) as server, local_cluster(1) as (cluster, client):
        client.register_plugin(NoticeBoard())
        board = NoticeBoard.of(cluster.scheduler)
        client.register_plugin(MetadataWatcher(provider, base_url=server.url,  # type: ignore[arg-type]
                                               poll_interval_s=0.05, grace_s=30.0))
        wait_for(lambda: server.polls >= 2)
        assert board.history() == ()
        seen_at = time.time()
        server.announce(announced)
        [notice] = wait_for(board.history)
        [address] = cluster.scheduler.workers
        assert notice.worker == address and notice.source == provider
        assert notice.instance_id == str(cluster.scheduler.workers[address].name)
        if provider == "gcp":
            assert seen_at + 30.0 <= notice.deadline <= time.time() + 30.0
        else:
            assert notice.deadline == announced
        # Forwarded once: the watcher's task has finished, so it polls no more.
        wait_for(lambda: all(client.run(_watcher_finished).values()))
        assert len(board.history()) == 1


def _watcher_finished(dask_worker: Any) -> bool:
    task = dask_worker.plugins[MetadataWatcher.name]._task
    return task is not None and task.done() and isinstance(task.result(), PreemptionNotice)


@pytest.mark.timeout(60)
def test_watcher_retries_until_a_notice_board_exists() -> None:
    with FakeMetadataServer("azure") as server, local_cluster(1) as (cluster, client):
        server.announce(time.time() + 60)
        client.register_plugin(MetadataWatcher("azure", base_url=server.url, poll_interval_s=0.05))
        wait_for(lambda: server.polls >= 3)  # it saw the notice and keeps trying to deliver it
        client.register_plugin(NoticeBoard())
        [notice] = wait_for(lambda: NoticeBoard.of(cluster.scheduler).history())
        assert notice.source == "azure"


@pytest.mark.timeout(60)
def test_a_worker_that_joins_later_gets_the_watcher() -> None:
    with FakeMetadataServer("gcp") as server, local_cluster(1) as (cluster, client):
        client.register_plugin(MetadataWatcher("gcp", base_url=server.url, poll_interval_s=0.05))
        cluster.scale(2)  # a worker joins after the plugin was registered (as `serve --metadata-watcher` does)
        client.wait_for_workers(2, timeout=30)
        wait_for(lambda: all(client.run(lambda dask_worker: MetadataWatcher.name in dask_worker.plugins).values()))
        watching = client.run(lambda dask_worker: dask_worker.plugins[MetadataWatcher.name]._task is not None)
        assert list(watching.values()) == [True, True]
