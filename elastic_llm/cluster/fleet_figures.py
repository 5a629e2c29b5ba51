"""The fleet page's Bokeh figures, drawn from a `FleetHistory.to_dict()` (no Dask here).

`FleetFigures` owns one `ColumnDataSource` per picture and a layout of four figures:

- instances over time: one bar per instance (spot orange, on-demand blue, unknown grey) from
  joining to leaving (or now), a triangle at its preemption notice, a cross where it was
  preempted or lost;
- latency over time: windowed P50 / P99 latency and P99 time to first token, with a dashed line
  at every preemption notice and instance loss, next to throughput (tokens/s) and queue length;
- configuration over time: D (ready replicas) as a step line, labelled with the shapes;
- cost over time: dollars spent against the on-demand-only counterfactual.

`update(history, now)` replaces the sources' data; the Dask page (`dashboard_page`) calls it
periodically, and the tests call it on a hand-made history.
"""

from __future__ import annotations

from typing import Any

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, HoverTool, Span
from bokeh.plotting import figure

#: Colour of each market's bars.
MARKET_COLOURS = {"spot": "#f28e2b", "on-demand": "#4e79a7", "unknown": "#9d9d9d"}
_HEIGHT = 260


def _ms(seconds: float | None) -> float | None:
    """Epoch seconds as Bokeh's datetime axis wants them (milliseconds)."""
    return None if seconds is None else seconds * 1000.0


def _time_figure(title: str, y_label: str, **kwargs: Any) -> Any:
    fig = figure(title=title, x_axis_type="datetime", height=_HEIGHT, sizing_mode="stretch_width",
                 tools="pan,xwheel_zoom,box_zoom,reset,save", toolbar_location="above", **kwargs)
    fig.yaxis.axis_label = y_label
    return fig


class FleetFigures:
    """The figures of the fleet page and the data sources behind them."""

    def __init__(self) -> None:
        self.instances = ColumnDataSource(dict(worker=[], market=[], start=[], end=[], colour=[], price=[],
                                               state=[]))
        self.notices = ColumnDataSource(dict(worker=[], time=[]))
        self.deaths = ColumnDataSource(dict(worker=[], time=[], end=[]))
        self.samples = ColumnDataSource(dict(time=[], latency_p50_s=[], latency_p99_s=[], ttft_p99_s=[],
                                             tokens_per_s=[], queued=[], running=[], replicas=[],
                                             configuration=[], cost_usd=[], on_demand_only_usd=[]))
        self.summary = Div(text="waiting for the controller ...", sizing_mode="stretch_width")
        self.timeline = self._timeline()
        self.latency = self._latency()
        self.load = self._load()
        self.configuration = self._configuration()
        self.cost = self._cost()
        self.layout = column(self.summary, self.timeline, row(self.latency, self.load, sizing_mode="stretch_width"),
                             row(self.configuration, self.cost, sizing_mode="stretch_width"),
                             sizing_mode="stretch_width")

    # ------------------------------------------------------------------ the figures
    def _timeline(self) -> Any:
        fig = _time_figure("Instances (orange: spot, blue: on-demand, grey: unknown; "
                           "triangle: notice, x: gone)", "instance", y_range=[])
        fig.hbar(y="worker", left="start", right="end", height=0.6, color="colour", source=self.instances)
        fig.scatter("time", "worker", marker="triangle", size=11, color="#e15759", source=self.notices)
        fig.scatter("time", "worker", marker="x", size=13, line_width=3, color="black", source=self.deaths)
        fig.add_tools(HoverTool(tooltips=[("instance", "@worker"), ("market", "@market"),
                                          ("price", "$@price{0.000}/h"), ("state", "@state")]))
        return fig

    def _latency(self) -> Any:
        fig = _time_figure("Latency per window (dashed: preemption notices and losses)", "seconds")
        for name, colour, label in (("latency_p50_s", "#4e79a7", "latency P50"),
                                    ("latency_p99_s", "#e15759", "latency P99"),
                                    ("ttft_p99_s", "#59a14f", "TTFT P99")):
            fig.line("time", name, color=colour, line_width=2, legend_label=label, source=self.samples)
        fig.legend.location = "top_left"
        return fig

    def _load(self) -> Any:
        fig = _time_figure("Throughput and queue", "tokens/s, requests")
        fig.line("time", "tokens_per_s", color="#76b7b2", line_width=2, legend_label="tokens/s", source=self.samples)
        fig.line("time", "queued", color="#edc948", line_width=2, legend_label="queued", source=self.samples)
        fig.line("time", "running", color="#b07aa1", line_width=2, legend_label="running", source=self.samples)
        fig.legend.location = "top_left"
        return fig

    def _configuration(self) -> Any:
        fig = _time_figure("Configuration: D ready replicas", "replicas")
        fig.step("time", "replicas", mode="after", line_width=2, color="#4e79a7", source=self.samples)
        fig.add_tools(HoverTool(tooltips=[("configuration", "@configuration")]))
        return fig

    def _cost(self) -> Any:
        fig = _time_figure("Cost so far vs on-demand only", "USD")
        fig.line("time", "cost_usd", color="#f28e2b", line_width=2, legend_label="this fleet", source=self.samples)
        fig.line("time", "on_demand_only_usd", color="#4e79a7", line_width=2, line_dash="dashed",
                 legend_label="on-demand only", source=self.samples)
        fig.legend.location = "top_left"
        return fig

    # ------------------------------------------------------------------ data
    def update(self, history: dict[str, Any], now: float) -> None:
        """Redraw from `history` (`FleetHistory.to_dict()`), bars of held instances up to `now`."""
        lives = history.get("instances", [])
        self.instances.data = dict(
            worker=[life["worker"] for life in lives], market=[life["market"] for life in lives],
            start=[_ms(life["joined_at"]) for life in lives],
            end=[_ms(life["left_at"] if life["left_at"] is not None else now) for life in lives],
            colour=[MARKET_COLOURS.get(life["market"], MARKET_COLOURS["unknown"]) for life in lives],
            price=[life["price_per_hour"] for life in lives], state=[life["state"] for life in lives])
        self.timeline.y_range.factors = [life["worker"] for life in lives]
        noticed = [life for life in lives if life["noticed_at"] is not None]
        self.notices.data = dict(worker=[life["worker"] for life in noticed],
                                 time=[_ms(life["noticed_at"]) for life in noticed])
        gone = [life for life in lives if life["left_at"] is not None]
        self.deaths.data = dict(worker=[life["worker"] for life in gone], time=[_ms(life["left_at"]) for life in gone],
                                end=[life["end"] for life in gone])
        samples = history.get("samples", [])
        data: dict[str, list[Any]] = {key: [s[key] for s in samples] for key in self.samples.data if key != "time"}
        data["time"] = [_ms(s["time"]) for s in samples]
        self.samples.data = {key: [float("nan") if v is None else v for v in values] if key != "configuration"
                             else values for key, values in data.items()}
        self._mark_churn(noticed, gone)
        self.summary.text = _summary(samples, lives)

    def _mark_churn(self, noticed: list[dict[str, Any]], gone: list[dict[str, Any]]) -> None:
        marks = [Span(location=_ms(life["noticed_at"]), dimension="height", line_dash="dashed",
                      line_color="#e15759", line_width=1) for life in noticed]
        marks += [Span(location=_ms(life["left_at"]), dimension="height", line_dash="dotted",
                       line_color="black", line_width=1) for life in gone if life["end"] == "lost"]
        self.latency.center = [r for r in self.latency.center if not isinstance(r, Span)] + marks


def _summary(samples: list[dict[str, Any]], lives: list[dict[str, Any]]) -> str:
    """One line of the latest figures, in HTML."""
    if not samples:
        return "<b>elastic_llm</b>: no sample yet"
    last = samples[-1]
    held = [life for life in lives if life["left_at"] is None]
    markets = {m: sum(1 for life in held if life["market"] == m) for m in MARKET_COLOURS}
    saving = 1 - last["cost_usd"] / last["on_demand_only_usd"] if last["on_demand_only_usd"] else 0.0
    latest = next((s["latency_p99_s"] for s in reversed(samples) if s["latency_p99_s"] is not None), None)
    p99 = "-" if latest is None else f"{latest:.2f} s"
    return (f"<b>elastic_llm</b>: {len(held)} instances ({markets['spot']} spot, {markets['on-demand']} "
            f"on-demand, {markets['unknown']} unknown); D={last['replicas']} ({last['configuration']}); "
            f"latency P99 (latest window with finishes) {p99}; {last['tokens_per_s']:.1f} tokens/s; "
            f"queued {last['queued']}, running {last['running']}; cost ${last['cost_usd']:.4f} vs "
            f"${last['on_demand_only_usd']:.4f} on-demand only ({saving:.0%} saved)")
