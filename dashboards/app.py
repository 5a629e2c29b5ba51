"""Live monitor of elastic LLM serving: latency, replicas, churn and cost.

Run next to a cluster whose scheduler has the elastic_llm controller (any `ServingClient` registers
it):

    streamlit run dashboards/app.py -- --scheduler tcp://127.0.0.1:8786

or set ELASTIC_LLM_SCHEDULER. The page reads the controller's status every two seconds through the
scheduler handler `elastic_llm_status`; the same figures are on the Dask dashboard's `/metrics`
(prometheus) route.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import pandas as pd
import streamlit as st
from distributed import Client


def _scheduler_address() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler", default=os.environ.get("ELASTIC_LLM_SCHEDULER", "tcp://127.0.0.1:8786"))
    args, _ = parser.parse_known_args()
    return str(args.scheduler)


@st.cache_resource
def _connection(address: str) -> dict[str, Client]:
    # held in a dict: a Client is awaitable, which st.cache_resource would take for a coroutine
    return {"client": Client(address, timeout=10)}


def _status(client: Client) -> dict[str, Any]:
    return client.sync(client.scheduler.elastic_llm_status)  # type: ignore[no-any-return]


def _history(status: dict[str, Any]) -> pd.DataFrame:
    rows = st.session_state.setdefault("history", [])
    rows.append({"time": pd.Timestamp.now(), "latency mean (s)": status["latency_mean_s"],
                 "latency P99 (s)": status["latency_p99_s"], "queued": status["queued"],
                 "running": status["running"]})
    del rows[:-600]
    return pd.DataFrame(rows).set_index("time")


st.set_page_config(page_title="elastic_llm", layout="wide")
st.title("elastic_llm: serving on spot instances")
address = st.sidebar.text_input("Dask scheduler", _scheduler_address())


@st.fragment(run_every=2)
def live() -> None:
    """Everything on the page, refreshed every two seconds."""
    try:
        status = _status(_connection(address)["client"])
    except Exception as exc:  # noqa: BLE001 - show why instead of a traceback
        st.error(f"cannot read the controller at {address}: {exc}")
        return
    cost = status["cost"]
    cards = st.columns(7)
    cards[0].metric("queued / running", f"{status['queued']} / {status['running']}")
    cards[1].metric("finished", status["finished"])
    cards[2].metric("latency mean / P99", f"{status['latency_mean_s'] or 0:.1f} / {status['latency_p99_s'] or 0:.1f} s")
    cards[3].metric("cost (spot + on-demand)", f"${cost['spot_usd'] + cost['on_demand_usd']:.4f}",
                    f"{cost['savings_vs_on_demand']:.0%} below on-demand only")
    cards[4].metric("tokens recomputed", status["tokens_recomputed"])
    cards[5].metric("KV migrated", f"{status['kv_bytes_migrated'] / 2**20:.1f} MiB")
    cards[6].metric("prefix tokens reused", status.get("prefix_tokens_reused", 0))
    history = _history(status)
    left, right = st.columns(2)
    left.subheader("latency")
    left.line_chart(history[["latency mean (s)", "latency P99 (s)"]])
    right.subheader("load")
    right.line_chart(history[["queued", "running"]])
    st.subheader(f"replicas (policy: {status['policy']})")
    # nested counters ("scheduling": preemptions, swaps) become columns such as scheduling.preemptions
    st.dataframe(pd.json_normalize(status["replicas"]), use_container_width=True)
    if status["notices"]:
        st.subheader("preemption notices")
        notices = pd.DataFrame(status["notices"])
        for column in ("deadline", "received"):
            notices[column] = pd.to_datetime(notices[column], unit="s")
        st.dataframe(notices, use_container_width=True)
    if status.get("reshards"):
        st.subheader("shape changes (P, M) of sharded replicas")
        st.dataframe(pd.DataFrame(status["reshards"]), use_container_width=True)
    if status.get("load_replans"):
        st.subheader("plans made again because the arrival rate moved (requests/s)")
        replans = pd.DataFrame(status["load_replans"])
        replans["time"] = pd.to_datetime(replans["time"], unit="s")
        st.dataframe(replans, use_container_width=True)
    st.caption(f"updated {time.strftime('%H:%M:%S')} - controller overhead "
               f"{status['controller_overhead']:.2%} of step time")


live()
