"""Tables and Altair charts of the fleet, from the controller's status (with its ``history``).

Used by the Streamlit monitor (`dashboards/app.py`); plain functions of the status dict, so they
are tested without a browser. Every time is shown in one zone, UTC (`TIME_ZONE`), on the axes,
in the tables and in the page's caption alike.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd

#: The zone every time on the page is shown in.
TIME_ZONE = "UTC"
#: Colour of each market (the Dask page's colours).
MARKET_COLOURS = {"spot": "#f28e2b", "on-demand": "#4e79a7", "unknown": "#9d9d9d"}
_HEIGHT = 230


def when(seconds: float | None) -> pd.Timestamp | None:
    """Epoch seconds as a timestamp in `TIME_ZONE` (None stays None)."""
    if seconds is None or pd.isna(seconds):
        return None
    return pd.Timestamp(seconds, unit="s", tz=TIME_ZONE)


def _time_axis(title: str = f"time ({TIME_ZONE})") -> alt.X:
    return alt.X("time:T", title=title, scale=alt.Scale(type="utc"), axis=alt.Axis(format="%H:%M:%S"))


#: Names of the sampled figures in legends.
FIGURE_NAMES = {"latency_p50_s": "latency P50", "latency_p99_s": "latency P99", "ttft_p99_s": "TTFT P99",
                "tokens_per_s": "tokens/s", "queued": "queued", "running": "running"}


def short_address(address: str) -> str:
    """A worker address without its scheme ("tcp://127.0.0.1:4001" -> "127.0.0.1:4001")."""
    return address.split("://", 1)[-1]


def latest_value(samples: pd.DataFrame, column: str) -> float | None:
    """The newest non-empty value of a windowed figure (None when every window was empty)."""
    if samples.empty or column not in samples:
        return None
    values = samples[column].dropna()
    return None if values.empty else float(values.iloc[-1])


def samples_frame(history: dict[str, Any]) -> pd.DataFrame:
    """One row per sample (windowed latency, throughput, queue, D, cost), time in `TIME_ZONE`."""
    frame = pd.DataFrame(history.get("samples", []))
    if not frame.empty:
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    return frame


def instances_frame(history: dict[str, Any], now: float) -> pd.DataFrame:
    """One row per instance ever seen: market, price, joined / noticed / left, how it ended."""
    rows = []
    for life in history.get("instances", []):
        rows.append({"instance": short_address(life["worker"]), "market": life["market"], "$/h": life["price_per_hour"],
                     "state": life["state"], "joined": when(life["joined_at"]), "notice": when(life["noticed_at"]),
                     "deadline": when(life["deadline"]), "left": when(life["left_at"]),
                     "until": when(life["left_at"] if life["left_at"] is not None else now)})
    return pd.DataFrame(rows, columns=["instance", "market", "$/h", "state", "joined", "notice", "deadline",
                                       "left", "until"])


def events_frame(history: dict[str, Any]) -> pd.DataFrame:
    """The history's events, newest first."""
    frame = pd.DataFrame(history.get("events", []), columns=["time", "kind", "subject", "detail"])
    frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    frame["subject"] = frame["subject"].map(short_address)
    return frame.iloc[::-1].reset_index(drop=True)


def churn_marks(instances: pd.DataFrame) -> pd.DataFrame:
    """Times to mark on the latency chart: notices, and losses without a notice."""
    notices = [{"time": t, "mark": "preemption notice"} for t in instances["notice"].dropna()]
    lost = instances[(instances["state"] == "lost")]
    losses = [{"time": t, "mark": "lost without notice"} for t in lost["left"].dropna()]
    return pd.DataFrame(notices + losses, columns=["time", "mark"])


def latency_chart(samples: pd.DataFrame, marks: pd.DataFrame) -> alt.LayerChart:
    """Windowed P50 / P99 latency and P99 TTFT, with a rule at every notice and loss."""
    long = samples.melt(id_vars="time", value_vars=["latency_p50_s", "latency_p99_s", "ttft_p99_s"],
                        var_name="figure", value_name="seconds").dropna()
    long["figure"] = long["figure"].map(FIGURE_NAMES)
    lines = alt.Chart(long).mark_line(point=True).encode(
        _time_axis(), alt.Y("seconds:Q", title="seconds"), alt.Color("figure:N", title=None),
        tooltip=[alt.Tooltip("time:T", format="%H:%M:%S"), "figure:N", alt.Tooltip("seconds:Q", format=".2f")])
    rules = alt.Chart(marks).mark_rule(strokeDash=[4, 3], strokeWidth=2).encode(
        _time_axis(), alt.Color("mark:N", title=None,
                                scale=alt.Scale(domain=["preemption notice", "lost without notice"],
                                                range=["#e15759", "#000000"])),
        tooltip=[alt.Tooltip("time:T", format="%H:%M:%S"), "mark:N"])
    return alt.layer(lines, rules).resolve_scale(color="independent").properties(height=_HEIGHT)


def load_chart(samples: pd.DataFrame) -> alt.Chart:
    """Throughput (tokens/s), queued and running requests."""
    long = samples.melt(id_vars="time", value_vars=["tokens_per_s", "queued", "running"], var_name="figure")
    long["figure"] = long["figure"].map(FIGURE_NAMES)
    return alt.Chart(long).mark_line().encode(_time_axis(), alt.Y("value:Q", title="tokens/s, requests"),
                                              alt.Color("figure:N", title=None)).properties(height=_HEIGHT)


def timeline_chart(instances: pd.DataFrame) -> alt.LayerChart:
    """A bar per instance from joining to leaving, coloured by market; notices and ends marked."""
    colour = alt.Color("market:N", scale=alt.Scale(domain=list(MARKET_COLOURS), range=list(MARKET_COLOURS.values())))
    x = alt.X("joined:T", title=f"time ({TIME_ZONE})", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%H:%M:%S"))
    bars = alt.Chart(instances).mark_bar(height=14).encode(
        x, x2="until:T", y=alt.Y("instance:N", sort=None, title=None,
                                 axis=alt.Axis(labelLimit=200, labelOverlap=False)), color=colour,
        tooltip=["instance", "market", "$/h", "state", alt.Tooltip("joined:T", format="%H:%M:%S"),
                 alt.Tooltip("left:T", format="%H:%M:%S")])
    notices = alt.Chart(instances.dropna(subset=["notice"])).mark_point(shape="triangle-down", size=120,
                                                                      filled=True, color="#e15759").encode(
        alt.X("notice:T", scale=alt.Scale(type="utc")), y=alt.Y("instance:N", sort=None))
    ends = alt.Chart(instances.dropna(subset=["left"])).mark_point(shape="cross", size=140, filled=True,
                                                                 color="black").encode(
        alt.X("left:T", scale=alt.Scale(type="utc")), y=alt.Y("instance:N", sort=None))
    rows = max(1, len(instances))
    return alt.layer(bars, notices, ends).properties(height=min(420, 28 * rows + 40))


def configuration_chart(samples: pd.DataFrame) -> alt.Chart:
    """D (ready replicas) over time as a step line; the tooltip names the shapes."""
    return alt.Chart(samples).mark_line(interpolate="step-after").encode(
        _time_axis(), alt.Y("replicas:Q", title="D (ready replicas)", axis=alt.Axis(tickMinStep=1)),
        tooltip=[alt.Tooltip("time:T", format="%H:%M:%S"), "configuration:N"]).properties(height=_HEIGHT)


def cost_chart(samples: pd.DataFrame) -> alt.Chart:
    """Dollars spent so far against the on-demand-only counterfactual."""
    long = samples.rename(columns={"cost_usd": "this fleet", "on_demand_only_usd": "on-demand only"}).melt(
        id_vars="time", value_vars=["this fleet", "on-demand only"], var_name="figure", value_name="usd")
    return alt.Chart(long).mark_line().encode(_time_axis(), alt.Y("usd:Q", title="USD so far"),
                                              alt.Color("figure:N", title=None)).properties(height=_HEIGHT)


def saving_words(cost: dict[str, Any]) -> str:
    """The saving against on-demand only, or why there is none to claim."""
    total = cost["spot_usd"] + cost["on_demand_usd"] + cost.get("unknown_usd", 0.0)
    if cost["on_demand_only_usd"] <= 0:
        return "no instance time yet"
    return f"{1 - total / cost['on_demand_only_usd']:.0%}"
