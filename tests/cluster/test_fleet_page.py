"""The fleet page of the Dask dashboard: its Bokeh document from a history, and where it is served."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from distributed import Client, LocalCluster
from bokeh.document import Document
from bokeh.models import Span
from bokeh.plotting import figure

from elastic_llm.cluster.controller import ElasticController
from elastic_llm.cluster.dashboard_page import ROUTE, add_to_dashboard, fleet_doc
from elastic_llm.cluster.fleet_figures import MARKET_COLOURS, FleetFigures
from elastic_llm.control import events as ev
from elastic_llm.control.history import FleetHistory

from tests.control.harness import Harness
from .helpers import wait_for


def _history_with_churn() -> dict[str, object]:
    """Spot a and b, an on-demand c, a worker without metadata d; a noticed and preempted, b lost."""
    h = Harness()
    history = FleetHistory(interval_s=0.0)
    h.join("a", "b", market="spot", price_per_hour=1.9)
    h.join("c", market="on-demand", price_per_hour=3.9)
    h.join("d", market="unknown", price_per_hour=3.9)
    history.observe(h.fleet, h.now, 0.0, 0.0)
    h.send(ev.WorkerNoticed("a", h.now + 30.0), at=h.now + 5)
    history.observe(h.fleet, h.now, 0.01, 0.02)
    h.send(ev.WorkerLost("a"), at=h.now + 30)
    h.send(ev.WorkerLost("b"))
    history.observe(h.fleet, h.now, 0.05, 0.08)
    return history.to_dict()


def test_the_figures_draw_every_instance_its_market_notice_and_end() -> None:
    figures = FleetFigures()
    figures.update(_history_with_churn(), now=2000.0)
    bars = figures.instances.data
    assert bars["worker"] == ["a", "b", "c", "d"]
    assert bars["colour"] == [MARKET_COLOURS["spot"]] * 2 + [MARKET_COLOURS["on-demand"], MARKET_COLOURS["unknown"]]
    assert bars["end"][0] == 1035.0 * 1000 and bars["end"][2] == 2000.0 * 1000  # gone / held up to now
    assert figures.timeline.y_range.factors == ["a", "b", "c", "d"]
    assert figures.notices.data["worker"] == ["a"] and figures.notices.data["time"] == [1005.0 * 1000]
    assert sorted(zip(figures.deaths.data["worker"], figures.deaths.data["end"])) == [("a", "preempted"),
                                                                                      ("b", "lost")]
    spans = [r for r in figures.latency.center if isinstance(r, Span)]
    assert sorted(s.location for s in spans) == [1005.0 * 1000, 1035.0 * 1000]  # the notice, the loss
    samples = figures.samples.data
    assert len(samples["time"]) == 3 and samples["replicas"] == [4, 3, 2]
    assert samples["cost_usd"][-1] == 0.05 and samples["on_demand_only_usd"][-1] == 0.08
    assert "2 instances (0 spot, 1 on-demand, 1 unknown)" in figures.summary.text
    assert "38% saved" in figures.summary.text


def test_the_page_is_a_valid_bokeh_document_with_or_without_a_controller() -> None:
    class FakeScheduler:
        plugins: dict[str, object] = {}

    doc = Document()
    fleet_doc(FakeScheduler(), {}, doc)
    assert "no elastic_llm controller" in doc.roots[0].children[0].text
    titles = {m.title.text for m in doc.select({"type": figure}) if m.title is not None}
    assert any(t.startswith("Instances") for t in titles) and any(t.startswith("Cost") for t in titles)
    assert doc.to_json(deferred=False)["roots"]  # serialisable: what the browser receives

    class WithController:
        def __init__(self) -> None:
            self.plugins = {"elastic_llm": type("C", (), {"history": _StoredHistory()})()}

    doc = Document()
    fleet_doc(WithController(), {}, doc)
    assert "D=2" in doc.roots[0].children[0].text


class _StoredHistory:
    def to_dict(self) -> dict[str, object]:
        return _history_with_churn()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback only
        return str(answer.read().decode())


@pytest.mark.timeout(60)
def test_a_local_cluster_serves_the_page_lists_it_and_the_status_handler_returns_the_history() -> None:
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(ElasticController(model="no-model-needed-without-workers"))
        scheduler = cluster.scheduler
        assert add_to_dashboard(scheduler)  # already served: the controller's start added it
        base = f"http://127.0.0.1:{scheduler.http_server.port}"
        assert "bokeh" in _get(base + ROUTE).lower()
        assert 'href="fleet"' in _get(base + "/status")
        status = wait_for(lambda: client.sync(client.scheduler.elastic_llm_status, history_since=0))
        history = wait_for(lambda: client.sync(client.scheduler.elastic_llm_status, history_since=0)["history"]
                           ["samples"], timeout=10)
        assert history[-1]["instances"] == 0 and "history" not in client.sync(client.scheduler.elastic_llm_status)
        assert status["cost"]["unknown_usd"] == 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(90)
def test_dask_scheduler_with_the_preload_serves_and_lists_the_page() -> None:
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
               "--dashboard-address", f"127.0.0.1:{dashboard}", "--preload", "elastic_llm.cluster.dashboard_page"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{dashboard}"

        def page() -> str | None:
            try:
                return _get(base + ROUTE)
            except OSError:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                return None

        assert "bokeh" in wait_for(page, timeout=60, interval=0.5).lower()
        assert 'href="fleet"' in _get(base + "/status")
    finally:
        process.terminate()
        process.wait(timeout=30)
