"""The Streamlit monitor (`dashboards/app.py`) under `AppTest`, against live LocalClusters."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster
from streamlit.testing.v1 import AppTest

from elastic_llm.cluster.controller import ElasticController
from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.cluster.traces import SpotTrace
from tests.cluster.helpers import wait_for

APP = str(Path(__file__).parents[2] / "dashboards" / "app.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(address: str) -> AppTest:
    """One run of the page (it reads ELASTIC_LLM_SCHEDULER, which the test set to `address`)."""
    at = AppTest.from_file(APP, default_timeout=30)
    main = sys.modules["__main__"]
    try:
        at.run()
    finally:  # AppTest leaves the page as __main__, which every process spawned later would re-run
        sys.modules["__main__"] = main
    assert not at.exception, at.exception
    assert at.sidebar.text_input[0].value == address
    return at


def _controller_only(port: int) -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(n_workers=0, processes=False, scheduler_port=port, dashboard_address=None,
                           host="127.0.0.1")
    client = Client(cluster)
    client.register_plugin(ElasticController(model="no-model-needed-without-workers"))
    return cluster, client


@pytest.mark.timeout(120)
def test_the_page_reconnects_when_the_scheduler_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    monkeypatch.setenv("ELASTIC_LLM_SCHEDULER", address)
    monkeypatch.setenv("ELASTIC_LLM_MONITOR_TIMEOUT_S", "2")
    cluster, client = _controller_only(port)
    try:
        assert not _run(address).error  # connected: the cached client now belongs to this scheduler
    finally:
        client.close()
        cluster.close()
    down = _run(address)
    assert down.error and "cannot read the controller" in down.error[0].value  # said, not a traceback
    cluster, client = _controller_only(port)
    try:
        back = wait_for(lambda: (lambda at: at if not at.error else None)(_run(address)), timeout=60, interval=1)
        assert "UTC" in back.caption[0].value
    finally:
        client.close()
        cluster.close()


def _datasets(chart: Any) -> list[pd.DataFrame]:
    """The data frames a Vega-Lite element carries (Arrow IPC bytes)."""
    return [pa.ipc.open_stream(named.data.data).read_pandas() for named in chart.proto.datasets]


@pytest.mark.timeout(240)
def test_a_preemption_shows_on_the_timeline_the_latency_chart_and_the_tables(
        monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Callable[[str], Path]) -> None:
    checkpoint = str(tiny_checkpoint("llama-gqa-untied"))
    with LocalCluster(n_workers=0, processes=True, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        emulator = SpotEmulator(cluster, SpotTrace("manual", 0.0, ()), grace_s=2.0, memory_bytes=2**30)
        for name in "ab":
            emulator.acquire(name, market="spot", price_per_hour=1.9)
        options = ReplicaOptions(model=checkpoint, max_batch_size=4, min_step_seconds=0.02)
        with ServingClient(client, model=checkpoint, replica=options, chat=False, migration_margin_s=1.0) as llm:
            llm.wait_for_replicas(2, timeout=120)
            futures = llm.map([[1, 2, 3, 4]] * 4, max_new_tokens=24, ignore_eos=True)
            emulator.preempt("a", notice=True)
            for future in futures:
                future.result(timeout=120)

            def preempted() -> dict[str, Any] | None:
                history = client.sync(client.scheduler.elastic_llm_status, history_since=0)["history"]
                ended = {life["worker"]: life["end"] for life in history["instances"]}
                return history if "preempted" in ended.values() and history["samples"] else None

            wait_for(preempted, timeout=30, interval=0.5)
            address = cluster.scheduler_address
            monkeypatch.setenv("ELASTIC_LLM_SCHEDULER", address)
            at = _run(address)
    assert not at.error
    labels = {m.label: m.value for m in at.metric}
    assert labels["notices"] == "1" and labels["instances (spot)"] == "1 (1)"
    assert labels["cost so far"].startswith("$") and labels["finished"] == "4"
    assert labels["saved vs on-demand only"].endswith("%")
    instances = at.dataframe[0].value
    assert sorted(instances["market"]) == ["spot", "spot"]
    assert sorted(instances["state"]) == ["preempted", "up"]
    assert instances["notice"].notna().sum() == 1
    events = at.dataframe[1].value
    assert {"joined", "notice", "preempted", "migration"} <= set(events["kind"])
    charts = at.get("vega_lite_chart")
    assert len(charts) == 5  # timeline, latency, load, configuration, cost
    assert all('"utc"' in chart.proto.spec for chart in charts)  # one zone on every axis
    marks = [frame for chart in charts for frame in _datasets(chart) if "mark" in frame.columns]
    assert [list(frame["mark"]) for frame in marks] == [["preemption notice"]]  # on the latency chart
