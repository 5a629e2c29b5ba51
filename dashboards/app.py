"""Live monitor of elastic LLM serving: instances, latency, configuration and cost over time.

Run next to a cluster whose scheduler has the elastic_llm controller (any `ServingClient` registers
it):

    streamlit run dashboards/app.py -- --scheduler tcp://127.0.0.1:8786

or set ELASTIC_LLM_SCHEDULER. Every two seconds the page reads the controller's status with its
history (the handler ``elastic_llm_status(history_since=0)``), so a page opened late still shows
the run from its start. When the scheduler goes away the page says so and reconnects once it is
back. Every time is in UTC. The same pictures are on the Dask dashboard's ``/fleet`` page, the
figures on its ``/metrics`` route (Prometheus).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

import pandas as pd
import streamlit as st
from distributed import Client

import fleet_charts as charts

#: Seconds connecting or one status call may take before the page reports the scheduler
#: unreachable (ELASTIC_LLM_MONITOR_TIMEOUT_S).
CALL_TIMEOUT_S = float(os.environ.get("ELASTIC_LLM_MONITOR_TIMEOUT_S", "5"))


def _scheduler_address() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", default=os.environ.get("ELASTIC_LLM_SCHEDULER", "tcp://127.0.0.1:8786"))
    args, _ = parser.parse_known_args()
    return str(args.scheduler)


def _running(connection: dict[str, Client]) -> bool:
    """Whether a cached client still works; one that does not is closed (and then replaced)."""
    client = connection["client"]
    if client.status == "running":
        return True
    with contextlib.suppress(Exception):
        client.close(timeout=1)
    return False


@st.cache_resource(validate=_running)  # a closed client is replaced, not served to every session
def _connection(address: str) -> dict[str, Client]:
    # held in a dict: a Client is awaitable, which st.cache_resource would take for a coroutine
    return {"client": Client(address, timeout=CALL_TIMEOUT_S)}


def _status(address: str) -> dict[str, Any]:
    """The controller's status with its history; on any failure the cached client is dropped, so
    the next refresh connects afresh (a restarted scheduler is found again)."""
    try:
        client = _connection(address)["client"]
        return client.sync(client.scheduler.elastic_llm_status,  # type: ignore[no-any-return]
                           history_since=0, callback_timeout=CALL_TIMEOUT_S)
    except Exception:
        with contextlib.suppress(Exception):
            cached = _connection(address)["client"]
            cached.close(timeout=1)
        _connection.clear()
        raise


def _cards(status: dict[str, Any], samples: pd.DataFrame) -> None:
    """Two rows of four short cards (they fit 1280 px)."""
    cost = status["cost"]
    p99 = charts.latest_value(samples, "latency_p99_s")
    held = status["workers"]
    spot = sum(1 for w in held if w["market"] == "spot")
    first = st.columns(4)
    first[0].metric("queued / running", f"{status['queued']} / {status['running']}")
    first[1].metric("finished", status["finished"])
    first[2].metric("P99 latency, latest window", "-" if p99 is None else f"{p99:.2f} s")
    first[3].metric("instances (spot)", f"{len(held)} ({spot})")
    second = st.columns(4)
    total = cost["spot_usd"] + cost["on_demand_usd"] + cost.get("unknown_usd", 0.0)
    second[0].metric("cost so far", f"${total:.4f}")
    second[1].metric("saved vs on-demand only", charts.saving_words(cost))
    second[2].metric("notices", len(status["notices"]))
    second[3].metric("tokens recomputed", status["tokens_recomputed"])


def _pictures(history: dict[str, Any], now: float) -> None:
    samples, instances = charts.samples_frame(history), charts.instances_frame(history, now)
    st.subheader("instances (orange spot, blue on-demand, grey unknown; triangle notice, cross gone)")
    if instances.empty:
        st.info("no instance has joined yet")
    else:
        st.altair_chart(charts.timeline_chart(instances), use_container_width=True)
    if samples.empty:
        st.info("no sample yet: the controller samples once a second")
        return
    left, right = st.columns(2)
    left.subheader("latency per window")
    left.altair_chart(charts.latency_chart(samples, charts.churn_marks(instances)), use_container_width=True)
    right.subheader("throughput and queue")
    right.altair_chart(charts.load_chart(samples), use_container_width=True)
    left, right = st.columns(2)
    left.subheader("configuration")
    left.altair_chart(charts.configuration_chart(samples), use_container_width=True)
    right.subheader("cost vs on-demand only")
    right.altair_chart(charts.cost_chart(samples), use_container_width=True)
    st.subheader("instances")
    st.dataframe(instances.drop(columns=["until"]), use_container_width=True, hide_index=True)
    st.subheader("events (newest first)")
    st.dataframe(charts.events_frame(history), use_container_width=True, hide_index=True)


st.set_page_config(page_title="elastic_llm", layout="wide", initial_sidebar_state="collapsed")
st.title("elastic_llm: serving on spot instances")
address = st.sidebar.text_input("Dask scheduler", _scheduler_address())


@st.fragment(run_every=2)
def live() -> None:
    """Everything on the page, refreshed every two seconds."""
    try:
        status = _status(address)
    except Exception as exc:  # noqa: BLE001 - show why instead of a traceback, retry next refresh
        st.error(f"cannot read the controller at {address} ({type(exc).__name__}: {exc}); "
                 f"retrying every 2 s")
        return
    history = status.get("history", {})
    now = time.time()
    _cards(status, charts.samples_frame(history))
    _pictures(history, now)
    st.subheader(f"replicas (policy: {status['policy']})")
    # nested counters ("scheduling": preemptions, swaps) become columns such as scheduling.preemptions
    st.dataframe(pd.json_normalize(status["replicas"]), use_container_width=True)
    if status.get("reshards"):
        st.subheader("shape changes (P, M) of sharded replicas")
        st.dataframe(pd.DataFrame(status["reshards"]), use_container_width=True)
    if status.get("load_replans"):
        st.subheader("plans made again because the arrival rate moved (requests/s)")
        replans = pd.DataFrame(status["load_replans"])
        replans["time"] = pd.to_datetime(replans["time"], unit="s", utc=True)  # UTC, as every time here
        st.dataframe(replans, use_container_width=True)
    st.caption(f"updated {charts.when(now):%H:%M:%S} {charts.TIME_ZONE} (every time on this page is "
               f"{charts.TIME_ZONE}) - KV migrated {status['kv_bytes_migrated'] / 2**20:.1f} MiB - prefix tokens "
               f"reused {status.get('prefix_tokens_reused', 0)} - controller "
               f"overhead {status['controller_overhead']:.2%} of step time")


live()
