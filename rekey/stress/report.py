"""``rekey stress report``: one self-contained HTML file over one or more stress run directories.

Each run is read whole (`load_run`) and its summary recomputed from the raw files
(`rekey.stress.summary`): the tables are what the events say, not what summary.json says (a
crashed run has none; when one exists and disagrees with the events, the report says so). The
plots are drawn with matplotlib's Agg renderer into PNGs embedded as ``data:`` URIs, in a page
made from ``templates/report.html.j2``; the page loads nothing from anywhere. Several runs share
each time plot, one colour per run (`Run.colour`), labelled by the run's label.

docs/stress-report.md explains every plot and how to read an incident.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jinja2
import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from numpy.typing import NDArray

from rekey.stress.summary import (
    OUTCOMES,
    SECONDS,
    Events,
    RunDirError,
    decode_hdr,
    hdr_max_ms,
    hdr_ms,
    label_of,
    new_hdr,
    read_events,
    read_incidents,
    read_meta,
    read_recorded_summary,
    read_rotations,
    read_seconds,
    recorded_thresholds,
    summarize_parts,
)

RUN_COLOURS: Final = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
"""One colour per run, in the order the runs are given (matplotlib's tab10)."""

PHASE_COLOURS: Final = {
    "PREPARING": "#d9d9d9",
    "REWRAPPING": "#9ecae1",
    "VERIFYING": "#a1d99b",
    "AWAITING_COMMIT": "#fdd0a2",
    "RETIRING": "#bcbddc",
    "AWAITING_DESTROY": "#fcbba1",
    "DESTROYING": "#fc9272",
    "BLOCKED": "#fb6a4a",
    "ABORTED": "#969696",
}
"""The rotation phases (RotateKeyWorkflow's) as spans on the rotation timeline."""
OTHER_PHASE_COLOURS: Final = ("#c6dbef", "#e5f5e0", "#fee6ce", "#efedf5", "#f0f0f0")
INCIDENT_COLOUR: Final = "#b10026"
TERMINAL_EVENTS: Final = ("done", "failed", "unfinished")

MAX_POINTS: Final = 600
"""Time plots merge seconds into bins so that no line has more points than this."""
MAX_INCIDENT_LABELS: Final = 40
"""Incidents labelled on the rotation timeline of a run (all are drawn, and all listed)."""
DPI: Final = 100
STEPS: Final = "steps-mid"
"""Counts per second are drawn as steps: each bin's value over its whole width."""
WIDTH_IN: Final = 10.0


@dataclass(frozen=True)
class Run:
    """One run directory, read."""

    path: Path
    meta: dict[str, Any]
    label: str
    colour: str
    events: Events
    seconds: list[dict[str, Any]]
    rotations: list[dict[str, Any]]
    incidents: list[dict[str, Any]]
    recorded: dict[str, Any] | None
    """summary.json as the run wrote it (None: the run crashed before writing it)."""
    summary: dict[str, Any]
    """Recomputed from the raw files, its ``label`` the meta's (`label` may add the directory's
    name to tell runs apart); the verdicts ``interrupted`` and ``thresholds`` are the
    recorded ones, which the raw files cannot tell."""
    mismatches: list[str] = field(default_factory=list)
    """Where summary.json disagrees with the events."""


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    png: str
    """Base64 PNG."""
    caption: str


def load_run(path: Path, *, colour: str = RUN_COLOURS[0], label: str | None = None) -> Run:
    """Read the run in ``path`` and recompute its summary; `RunDirError` if it is no readable run."""
    path = Path(path)
    meta = read_meta(path)
    events = read_events(path)
    seconds = read_seconds(path)
    rotations = read_rotations(path)
    incidents = read_incidents(path)
    recorded = read_recorded_summary(path)
    summary = summarize_parts(
        meta,
        events,
        seconds,
        rotations,
        incidents,
        interrupted=bool(recorded.get("interrupted")) if recorded is not None else True,
        thresholds=recorded_thresholds(recorded),
    )
    return Run(
        path=path,
        meta=meta,
        label=label or label_of(meta),
        colour=colour,
        events=events,
        seconds=seconds,
        rotations=rotations,
        incidents=incidents,
        recorded=recorded,
        summary=summary,
        mismatches=_mismatches(recorded, summary),
    )


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """The runs in ``paths``, one colour each, their labels made distinct (two runs with the
    same label are told apart by their directory's name)."""
    if not paths:
        raise RunDirError("no run directory given")
    labels = [label_of(read_meta(Path(p))) for p in paths]
    seen: dict[str, int] = defaultdict(int)
    for label in labels:
        seen[label] += 1
    distinct: list[str] = []
    for path, label in zip(paths, labels, strict=True):
        name = label if seen[label] == 1 else f"{label} ({Path(path).name})"
        while name in distinct:
            name = f"{name}'"
        distinct.append(name)
    return [
        load_run(Path(p), colour=RUN_COLOURS[i % len(RUN_COLOURS)], label=distinct[i])
        for i, p in enumerate(paths)
    ]


def _mismatches(recorded: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[str]:
    if recorded is None:
        return []
    found = []
    for key in ("offered", "done", "ok", "attempts", "outcomes", "incidents"):
        if key in recorded and recorded[key] != summary[key]:
            found.append(f"summary.json has {key} {recorded[key]}, the raw files {summary[key]}")
    return found


# -- per-second series ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """A run's seconds.jsonl merged into bins of ``width`` seconds (rates per second)."""

    t: NDArray[np.float64]
    """Middle of each bin, seconds since t0."""
    width: int
    offered: NDArray[np.float64]
    goodput: NDArray[np.float64]
    done: NDArray[np.float64]
    p50: NDArray[np.float64]
    p99: NDArray[np.float64]
    pmax: NDArray[np.float64]
    throttled_share: NDArray[np.float64]
    throttle_wait: NDArray[np.float64]
    errors: dict[str, NDArray[np.float64]]
    lag_p99: NDArray[np.float64]


def bin_width(runs: Sequence[Run]) -> int:
    """Seconds per point so that the longest run has at most `MAX_POINTS` points."""
    span = max((int(s["t"]) + 1 for run in runs for s in run.seconds), default=1)
    return max(1, math.ceil(span / MAX_POINTS))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _hdr_figures(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float, float]:
    encoded = [row[key] for row in rows if isinstance(row.get(key), str)]
    if not encoded:
        return math.nan, math.nan, math.nan
    total = new_hdr()
    for item in encoded:
        total.add(decode_hdr(item, where=SECONDS))
    p50, p99, top = hdr_ms(total, 50), hdr_ms(total, 99), hdr_max_ms(total)
    return (
        math.nan if p50 is None else p50,
        math.nan if p99 is None else p99,
        math.nan if top is None else top,
    )


def series_of(run: Run, width: int, classes: Sequence[str]) -> Series:
    bins: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for second in run.seconds:
        bins[int(second["t"]) // width].append(second)
    keys = sorted(bins)
    columns: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[float]] = {name: [] for name in classes}
    for key in keys:
        rows = bins[key]
        n = float(len(rows))
        columns["t"].append(key * width + width / 2.0)

        def total(name: str, rows: list[dict[str, Any]] = rows) -> float:
            return sum(_number(row.get(name)) for row in rows)

        columns["offered"].append(total("offered") / n)
        columns["goodput"].append(total("ok") / n)
        columns["done"].append(total("done") / n)
        p50, p99, top = _hdr_figures(rows, "hdr")
        columns["p50"].append(p50)
        columns["p99"].append(p99)
        columns["pmax"].append(top)
        attempts = total("attempts")
        columns["share"].append(100.0 * total("throttled_attempts") / attempts if attempts else math.nan)
        columns["wait"].append(total("throttle_wait") / n)
        columns["lag"].append(_hdr_figures(rows, "lag_hdr")[1])
        for name in classes:
            count = 0.0
            for row in rows:
                outcomes = row.get("outcomes")
                if isinstance(outcomes, dict):
                    count += _number(outcomes.get(name))
            errors[name].append(count / n)

    def array(name: str) -> NDArray[np.float64]:
        return np.asarray(columns[name], dtype=np.float64)

    return Series(
        t=array("t"),
        width=width,
        offered=array("offered"),
        goodput=array("goodput"),
        done=array("done"),
        p50=array("p50"),
        p99=array("p99"),
        pmax=array("pmax"),
        throttled_share=array("share"),
        throttle_wait=array("wait"),
        errors={name: np.asarray(values, dtype=np.float64) for name, values in errors.items()},
        lag_p99=array("lag"),
    )


def error_classes(runs: Sequence[Run]) -> list[str]:
    """The outcome classes other than ``ok`` that some run has, in `OUTCOMES` order."""
    present: set[str] = set()
    for run in runs:
        present.update(name for name in run.summary["outcomes"] if name != "ok")
        for second in run.seconds:
            outcomes = second.get("outcomes")
            if isinstance(outcomes, dict):
                present.update(str(name) for name, n in outcomes.items() if name != "ok" and n)
    return [name for name in OUTCOMES if name in present] + sorted(present - set(OUTCOMES))


# -- plots ---------------------------------------------------------------------------------------


def _figure(panels: int, height: float) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(WIDTH_IN, height * panels + 0.6), dpi=DPI, layout="constrained")
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds since the run's start")
    return figure, list(axes)


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _run_legend(ax: Axes, runs: Sequence[Run], extra: Sequence[Line2D | Patch] = ()) -> None:
    handles: list[Line2D | Patch] = [Line2D([], [], color=run.colour, lw=2, label=run.label) for run in runs]
    ax.legend(handles=[*handles, *extra], loc="upper left", fontsize=8, framealpha=0.85)


def _plot_load(runs: Sequence[Run], series: Sequence[Series]) -> Figure:
    figure, (ax,) = _figure(1, 3.4)
    for run, s in zip(runs, series, strict=True):
        ax.plot(s.t, s.offered, color=run.colour, ls="--", lw=1.2, drawstyle=STEPS)
        ax.plot(s.t, s.goodput, color=run.colour, lw=1.8, drawstyle=STEPS)
    ax.set_ylabel("operations / s")
    ax.set_ylim(bottom=0)
    styles = [
        Line2D([], [], color="black", ls="--", lw=1.2, label="offered (intended)"),
        Line2D([], [], color="black", lw=1.8, label="goodput (ok)"),
    ]
    _run_legend(ax, runs, styles)
    return figure


def _plot_latency(runs: Sequence[Run], series: Sequence[Series]) -> Figure:
    figure, (ax,) = _figure(1, 3.8)
    drawn = False
    for run, s in zip(runs, series, strict=True):
        ax.plot(s.t, s.pmax, color=run.colour, lw=0.8, alpha=0.45)
        ax.plot(s.t, s.p99, color=run.colour, lw=1.8)
        ax.plot(s.t, s.p50, color=run.colour, lw=1.2, ls=":")
        drawn = drawn or bool(np.any(np.isfinite(s.pmax) & (s.pmax > 0)))
    if drawn:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency, ms (from the intended start)")
    styles = [
        Line2D([], [], color="black", lw=1.2, ls=":", label="p50"),
        Line2D([], [], color="black", lw=1.8, label="p99"),
        Line2D([], [], color="black", lw=0.8, alpha=0.45, label="max"),
    ]
    _run_legend(ax, runs, styles)
    return figure


def _plot_throttling(runs: Sequence[Run], series: Sequence[Series]) -> Figure:
    figure, (share, wait) = _figure(2, 2.6)
    for run, s in zip(runs, series, strict=True):
        share.plot(s.t, s.throttled_share, color=run.colour, lw=1.5, drawstyle=STEPS)
        wait.plot(s.t, s.throttle_wait, color=run.colour, lw=1.5, drawstyle=STEPS)
    share.set_ylabel("throttled attempts, %")
    share.set_ylim(bottom=0)
    wait.set_ylabel("throttle wait, s per s")
    wait.set_ylim(bottom=0)
    _run_legend(share, runs)
    return figure


def _plot_errors(runs: Sequence[Run], series: Sequence[Series], classes: Sequence[str]) -> Figure:
    figure, axes = _figure(max(1, len(classes)), 2.0)
    if not classes:
        for run, s in zip(runs, series, strict=True):
            axes[0].plot(s.t, np.zeros_like(s.t), color=run.colour, lw=1.5)
        axes[0].set_ylabel("errors / s")
        axes[0].set_title("no operation failed", fontsize=9)
    for ax, name in zip(axes, classes, strict=False):
        for run, s in zip(runs, series, strict=True):
            ax.plot(s.t, s.errors[name], color=run.colour, lw=1.5, drawstyle=STEPS)
        ax.set_ylabel(f"{name} / s", fontsize=9)
        ax.set_ylim(bottom=0)
    _run_legend(axes[0], runs)
    return figure


def _plot_lag(runs: Sequence[Run], series: Sequence[Series]) -> Figure:
    figure, (ax,) = _figure(1, 3.0)
    for run, s in zip(runs, series, strict=True):
        ax.plot(s.t, s.lag_p99, color=run.colour, lw=1.5)
    ax.set_ylabel("schedule lag p99, ms")
    ax.set_ylim(bottom=0)
    _run_legend(ax, runs)
    return figure


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    phase: str


def phase_spans(rotations: Sequence[Mapping[str, Any]], end_of_run: float) -> list[Span]:
    """Each rotation's phases as spans: a phase lasts from the first observation of it to the
    next observation of another phase, or to the rotation's end (``done``, ``failed``,
    ``unfinished``), or to the end of the run when the run stopped first."""
    by_rotation: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rotations:
        by_rotation[str(row.get("rotation_id"))].append(row)
    spans: list[Span] = []
    for rows in by_rotation.values():
        phase: str | None = None
        since = 0.0
        finished = False
        for row in sorted(rows, key=lambda r: float(r["t"])):
            t = float(row["t"])
            event = row.get("event")
            observed = row.get("phase")
            if event in TERMINAL_EVENTS:
                if phase is not None and t > since:
                    spans.append(Span(since, t, phase))
                phase, finished = None, True
                break
            if isinstance(observed, str) and observed and observed != phase:
                if phase is not None and t > since:
                    spans.append(Span(since, t, phase))
                phase, since = observed, t
        if phase is not None and not finished and end_of_run > since:
            spans.append(Span(since, end_of_run, phase))
    return spans


def _phase_colours(runs: Sequence[Run]) -> dict[str, str]:
    colours = dict(PHASE_COLOURS)
    others = iter(OTHER_PHASE_COLOURS * 4)
    for run in runs:
        for row in run.rotations:
            phase = row.get("phase")
            if isinstance(phase, str) and phase and phase not in colours and phase != "DONE":
                colours[phase] = next(others, "#eeeeee")
    return colours


def _plot_rotations(runs: Sequence[Run]) -> Figure:
    figure, axes = _figure(len(runs), 1.9)
    colours = _phase_colours(runs)
    used: set[str] = set()
    end = max(run.summary["elapsed"] for run in runs)
    for ax, run in zip(axes, runs, strict=True):
        for span in phase_spans(run.rotations, run.summary["elapsed"]):
            ax.axvspan(span.start, span.end, ymin=0, ymax=1, color=colours.get(span.phase, "#eeeeee"), lw=0)
            used.add(span.phase)
        progress: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for row in run.rotations:
            total = _number(row.get("total"))
            if total > 0 and isinstance(row.get("rewrapped"), int | float):
                ts, fractions = progress[str(row.get("rotation_id"))]
                ts.append(float(row["t"]))
                fractions.append(min(1.0, _number(row.get("rewrapped")) / total))
            if row.get("event") in ("failed", "late"):
                marker = "X" if row.get("event") == "failed" else "v"
                ax.plot([float(row["t"])], [1.02], marker=marker, color=INCIDENT_COLOUR, ms=7, clip_on=False)
        for ts, fractions in progress.values():
            ax.step(ts, fractions, where="post", color=run.colour, lw=1.8)
        for number, incident in enumerate(run.incidents, start=1):
            t = float(incident["t"])
            stop = incident.get("end")
            ax.axvline(t, color=INCIDENT_COLOUR, lw=1.0, ls="--")
            if isinstance(stop, int | float) and not isinstance(stop, bool) and stop > t:
                ax.axvspan(t, float(stop), color=INCIDENT_COLOUR, alpha=0.12, lw=0)
            if number <= MAX_INCIDENT_LABELS:
                ax.text(
                    t,
                    0.94,
                    f" #{number} {incident.get('kind', '')}",
                    rotation=90,
                    va="top",
                    ha="left",
                    fontsize=7,
                    color=INCIDENT_COLOUR,
                    transform=ax.get_xaxis_transform(),
                )
        ax.set_ylim(0, 1.05)
        ax.set_xlim(0, end)
        ax.set_ylabel("re-wrapped", fontsize=8)
        ax.set_title(run.label, fontsize=9, color=run.colour, loc="left")
        if not run.rotations:
            ax.text(
                0.5, 0.5, "no rotation", transform=ax.transAxes, ha="center", va="center", color="#777777"
            )
    handles: list[Line2D | Patch] = [Patch(color=colours[p], label=p) for p in colours if p in used]
    handles.append(Line2D([], [], color=INCIDENT_COLOUR, ls="--", label="incident"))
    axes[0].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.45), ncol=6, fontsize=7)
    return figure


CAPTIONS: Final = {
    "load": "Offered load (dashed: operations per second scheduled at their intended times) against "
    "goodput (solid: operations per second that succeeded, counted when they completed). Where the "
    "solid line falls below the dashed one the backend is not keeping up: throttled, failing or slowed.",
    "latency": "Latency per second from each operation's intended start to its end (so time spent "
    "queued behind a stalled backend counts), from the per-second HDR histograms: p50 dotted, p99 "
    "solid, max faint; logarithmic scale. A p99 that climbs while p50 stays flat is a tail of retries "
    "or throttle waits; both climbing is a backend slowing down or a queue building.",
    "throttling": "Top: the share of requests sent that the backend answered with a throttle. Bottom: "
    "seconds spent waiting because of throttling (pacing and backoff) per second of run, which is also "
    "the average number of operations waiting at once. The governor keeps the share low by waiting; a "
    "naive client shows a high share and little waiting.",
    "errors": "Operations per second that ended in each outcome class other than ok, counted when they "
    "completed (one panel per class present in any run). throttled = gave up throttled, unavailable "
    "includes timeouts and answers lost, dropped = never sent because the in-flight cap was full.",
    "rotations": "One lane per run: the phases of each rotation as coloured spans, re-wrap progress "
    "(re-wrapped / total blobs) as a step line in the run's colour, a red X where a rotation failed "
    "and a red triangle where one ran late. Dashed red lines are incidents, numbered as in the "
    "incidents list below; a shaded band is an incident that lasted (from its start to its end).",
    "lag": "The generator's own schedule lag per second (p99 of how late an operation was dispatched "
    "after its intended time). It should stay near zero: when it grows, the load generator itself "
    "(not the backend) could not keep the schedule, and the offered load is less than asked.",
}
TITLES: Final = {
    "load": "Offered load and goodput",
    "latency": "Latency p50 / p99 / max",
    "throttling": "Throttling: share of attempts and time spent waiting",
    "errors": "Errors by outcome class",
    "rotations": "Rotation timeline and incidents",
    "lag": "Schedule lag p99",
}


def make_plots(runs: Sequence[Run]) -> list[Plot]:
    """The report's plots, every run on each (one colour per run). Text is drawn as it is:
    a label with ``$...$`` is not matplotlib mathtext (which would refuse unknown macros)."""
    with matplotlib.rc_context({"text.parse_math": False}):
        return _make_plots(runs)


def _make_plots(runs: Sequence[Run]) -> list[Plot]:
    width = bin_width(runs)
    classes = error_classes(runs)
    series = [series_of(run, width, classes) for run in runs]
    drawings: dict[str, Callable[[], Figure]] = {
        "load": lambda: _plot_load(runs, series),
        "latency": lambda: _plot_latency(runs, series),
        "throttling": lambda: _plot_throttling(runs, series),
        "errors": lambda: _plot_errors(runs, series, classes),
        "rotations": lambda: _plot_rotations(runs),
        "lag": lambda: _plot_lag(runs, series),
    }
    plots = []
    for key, draw in drawings.items():
        caption = CAPTIONS[key]
        if width > 1 and key != "rotations":
            caption += f" Each point merges {width} seconds."
        plots.append(Plot(key=key, title=TITLES[key], png=_png(draw()), caption=caption))
    return plots


# -- the page ------------------------------------------------------------------------------------


def _fmt_number(value: Any, digits: int = 1) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _fmt_percent(value: Any, digits: int = 2) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{100.0 * value:.{digits}f}%"


def _fmt_value(value: Any) -> str:
    """A meta parameter as text (objects as compact JSON)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value or "—"
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def _fmt_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("rekey.stress", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        num=_fmt_number,
        pct=_fmt_percent,
        value=_fmt_value,
        pretty=_fmt_json,
    )
    return environment


def _op_rows(run: Run) -> list[dict[str, Any]]:
    rows = [{"op": name, **figures} for name, figures in run.summary["ops"].items()]
    s = run.summary
    rows.append(
        {
            "op": "all",
            "count": s["done"],
            "rate": s["done"] / s["elapsed"] if s["elapsed"] else 0.0,
            "throughput": s["goodput"],
            "mean_ms": s["latency_ms"]["mean"],
            "p95_ms": s["latency_ms"]["p95"],
            "p99_ms": s["latency_ms"]["p99"],
            "success_ratio": s["success_ratio"],
        }
    )
    return rows


def _parameters(runs: Sequence[Run]) -> list[tuple[str, list[Any]]]:
    keys: list[str] = []
    for run in runs:
        keys.extend(key for key in run.meta if key not in keys)
    return [(key, [run.meta.get(key) for run in runs]) for key in keys]


def render_html(runs: Sequence[Run], *, generated_at: dt.datetime | None = None) -> str:
    """The report page over ``runs`` (one or more), every plot embedded."""
    if not runs:
        raise RunDirError("no run to report")
    when = (generated_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    template = _environment().get_template("report.html.j2")
    return template.render(
        runs=runs,
        plots=make_plots(runs),
        op_rows={run.label: _op_rows(run) for run in runs},
        outcome_classes=_outcome_rows(runs),
        parameters=_parameters(runs),
        generated_at=when,
    )


def _outcome_rows(runs: Sequence[Run]) -> list[str]:
    present: set[str] = set()
    for run in runs:
        present.update(run.summary["outcomes"])
    return [name for name in OUTCOMES if name in present] + sorted(present - set(OUTCOMES))


def write_report(runs: Sequence[Run], out: Path) -> Path:
    """Write the report page to ``out``, whole or not at all (a temporary file beside it,
    created with the user's umask, then renamed)."""
    page = render_html(runs)
    out = Path(out)
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as f:
            f.write(page)
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return out


def report(paths: Iterable[Path], out: Path | None) -> list[Run]:
    """Read the runs in ``paths`` and, when ``out`` is given, write their report there."""
    runs = load_runs([Path(p) for p in paths])
    if out is not None:
        write_report(runs, out)
    return runs
