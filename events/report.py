"""`python -m relay audit --html FILE`: the log as a report an auditor can read offline.

One HTML file with everything inline (styles, SVG charts drawn by matplotlib, tables):
no script, no font, no image and no style sheet is fetched when it is opened. It is
built from the log alone, in one snapshot: the audit's replay verifies the hash chain
and positions (and the head, without `--until`), then `events/report_data.py` folds the
same events into the figures. Only the wakeup interval, which no event records, comes
from the configuration. matplotlib is in the optional `report` extra, so the relay itself
does not carry it.
"""

from __future__ import annotations

import html
import io
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.replay import Replay, check_head, replay
from events.report_data import NO_ANSWER, OUTCOMES, ReportData, collect
from events.types import iso_ms
from relay.database import connect
from relay.exits import ExitStatus
from relay.tokens import redact

MAX_STEP_POINTS = 2_000  # points of the active-devices line; the rest are thinned out
TIME_BINS = 60  # bins of the failure-reasons chart
TOP_REASONS = 8  # reasons drawn on their own; the others are summed as "other"
TOP_TOKENS = 20
RUNS_LISTED = 100  # the runs table lists the latest ones
COLORS = {"delivered": "#2e7d32", "retried": "#81c784", "abandoned": "#f9a825",
          "dead": "#6d4c41", "unregistered": "#c62828", "kept": "#1565c0"}
MISSING_EXTRA = ("the HTML report needs matplotlib, from the `report` extra: "
                 "pip install 'apns-relay[report]'")


class ReportUnavailable(Exception):
    """The `report` extra is not installed."""


def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportUnavailable(MISSING_EXTRA) from None


@dataclass(frozen=True)
class Verification:
    verified: bool
    scope: str
    head: str | None
    last_position: int
    problems: list[str]


def verification(result: Replay, until_ms: int | None) -> Verification:
    scope = ("hash chain, positions and head" if until_ms is None
             else f"hash chain and positions up to {iso_ms(until_ms)} (--until)")
    problems = [p.what for p in result.chain_problems]
    return Verification(not result.chain_problem_count, scope,
                        result.last_hash.hex() if result.events else None,
                        result.last_position, problems)


def html_main(dsn: str, path: str, *, until_ms: int | None, interval: float | None) -> int:
    """Write the report to `path`; exit status 1 when the log does not verify."""
    try:
        require_plotting()
    except ReportUnavailable as exc:
        print(f"apns-relay: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    if not Path(path).parent.is_dir():
        print(f"apns-relay: cannot write {path}: no directory {Path(path).parent}",
              file=sys.stderr)
        return ExitStatus.USAGE
    with connect(dsn, application_name="relay-report") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        result = replay(conn, verify=True, until_ms=until_ms)
        if until_ms is None:
            with conn.cursor() as cur:
                check_head(cur, result)
        data = collect(conn, result.last_position)
    checked = verification(result, until_ms)
    _write_atomically(Path(path), render(data, checked, interval=interval, until_ms=until_ms))
    state = "verified" if checked.verified else "NOT verified"
    print(f"wrote {path}: {data.events:,} events, {len(data.runs):,} runs, log {state}")
    return ExitStatus.OK if checked.verified else ExitStatus.FAILURE


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as `open` would create it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# --- charts ----------------------------------------------------------------------------


def _figure(height: float = 3.2) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.5, height), dpi=96, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    return figure, axes


def _svg(figure: Any, name: str) -> str:
    """The figure as inline SVG: text kept as text, ids salted by chart (unique per page)."""
    from matplotlib import rc_context

    out = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        figure.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def _times(values: Any) -> Any:
    import numpy as np

    return np.asarray(values, dtype="int64").astype("datetime64[ms]")


def chart_active(data: ReportData) -> str | None:
    if not data.active_at:
        return None
    import numpy as np

    at = np.frombuffer(data.active_at, dtype="int64")
    count = np.frombuffer(data.active_count, dtype="int64")
    if len(at) > MAX_STEP_POINTS:
        keep = np.unique(np.append(np.linspace(0, len(at) - 1, MAX_STEP_POINTS).astype(int),
                                   len(at) - 1))
        at, count = at[keep], count[keep]
    if data.last_ms is not None and data.last_ms > at[-1]:
        at, count = np.append(at, data.last_ms), np.append(count, count[-1])
    figure, axes = _figure()
    axes.step(_times(at), count, where="post", color="#1565c0", gid="marks-active")
    axes.set_ylabel("active devices")
    axes.set_ylim(bottom=0)
    return _svg(figure, "active")


def chart_outcomes(data: ReportData) -> str | None:
    runs = sorted(data.runs)
    if not runs:
        return None
    figure, axes = _figure(3.6)
    positions = list(range(len(runs)))
    bottom = [0] * len(runs)
    for name in OUTCOMES:
        values = [data.runs[r].outcomes()[name] for r in runs]
        if not any(values):
            continue
        bars = axes.bar(positions, values, bottom=bottom, width=0.8, color=COLORS[name],
                        label=name)
        for i, bar in enumerate(bars):
            bar.set_gid(f"marks-outcomes-{name}-{i}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    _run_ticks(axes, runs)
    axes.set_ylabel("tokens")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _svg(figure, "outcomes")


def _run_ticks(axes: Any, runs: list[int]) -> None:
    step = max(1, len(runs) // 20)
    axes.set_xticks(list(range(0, len(runs), step)), [str(r) for r in runs[::step]])
    axes.set_xlabel("run")


def chart_failures(data: ReportData) -> str | None:
    if not any(data.failures.values()) or data.first_ms is None or data.last_ms is None:
        return None
    import numpy as np

    ranked = sorted(data.failures, key=lambda reason: -len(data.failures[reason]))
    shown, rest = ranked[:TOP_REASONS], ranked[TOP_REASONS:]
    edges = np.linspace(data.first_ms, max(data.last_ms, data.first_ms + 1), TIME_BINS + 1)
    series = [np.histogram(np.frombuffer(data.failures[r], dtype="int64"), edges)[0]
              for r in shown]
    labels = list(shown)
    if rest:
        series.append(np.sum([np.histogram(np.frombuffer(data.failures[r], dtype="int64"),
                                           edges)[0] for r in rest], axis=0))
        labels.append("other")
    figure, axes = _figure(3.6)
    centers = _times((edges[:-1] + edges[1:]) / 2)
    layers = axes.stackplot(centers, *series, labels=labels, alpha=0.85)
    for i, layer in enumerate(layers):
        layer.set_gid(f"marks-failures-{i}")
    width = (edges[1] - edges[0]) / 60_000
    axes.set_ylabel(f"failed attempts per {_minutes(width)}")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _svg(figure, "failures")


def _minutes(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.1f} min" if minutes >= 1 else f"{minutes * 60:.1f} s"


def latency_percentiles(data: ReportData) -> dict[int, tuple[float, float, float]]:
    import numpy as np

    found = {}
    for run, figures in sorted(data.runs.items()):
        if figures.latencies_ms:
            values = np.frombuffer(figures.latencies_ms, dtype="float64")
            p50, p95, p99 = np.percentile(values, [50, 95, 99])
            found[run] = (float(p50), float(p95), float(p99))
    return found


def chart_latency(percentiles: dict[int, tuple[float, float, float]]) -> str | None:
    if not percentiles:
        return None
    runs = sorted(percentiles)
    figure, axes = _figure()
    positions = list(range(len(runs)))
    for i, (name, color) in enumerate((("p50", "#2e7d32"), ("p95", "#f9a825"),
                                       ("p99", "#c62828"))):
        axes.plot(positions, [percentiles[r][i] for r in runs], marker="o", markersize=3,
                  color=color, label=name, gid=f"marks-latency-{name}")
    _run_ticks(axes, runs)
    axes.set_ylabel("APNs answer latency (ms)")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _svg(figure, "latency")


def chart_durations(data: ReportData, interval: float | None) -> str | None:
    runs = [r for r in sorted(data.runs) if data.runs[r].duration_s is not None]
    if not runs:
        return None
    durations = [float(data.runs[r].duration_s or 0.0) for r in runs]
    figure, axes = _figure()
    colors = ["#c62828" if interval is not None and d > interval else "#1565c0"
              for d in durations]
    bars = axes.bar(list(range(len(runs))), durations, color=colors, width=0.8)
    for i, bar in enumerate(bars):
        bar.set_gid(f"marks-durations-{i}")
    if interval is not None:
        axes.axhline(interval, color="#555555", linestyle="--",
                     label=f"wakeup.interval ({interval:g} s)")
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _run_ticks(axes, runs)
    axes.set_ylabel("run duration (s)")
    return _svg(figure, "durations")


# --- the page --------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 70em; margin: 2em auto;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
.ok { color: #2e7d32; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
code { font-size: 0.95em; word-break: break-all; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure.chart { margin: 0.5em 0; } figure.chart svg { max-width: 100%; height: auto; }
.note { color: #555; }
"""

Section = tuple[str, str, Callable[[], str | None]]


def render(data: ReportData, checked: Verification, *, interval: float | None,
           until_ms: int | None) -> str:
    """The whole page."""
    percentiles = latency_percentiles(data)
    span = (f"{iso_ms(data.first_ms)} to {iso_ms(data.last_ms)}"
            if data.first_ms is not None and data.last_ms is not None else "empty")
    sections: list[Section] = [
        ("Devices active over time", "Registered devices not unregistered since, after "
         "every registration and unregistration.", lambda: chart_active(data)),
        ("Outcomes per run", "Each token of a run ends as one of: " + ", ".join(OUTCOMES) +
         ". Delivered: accepted by APNs at the first attempt; retried: accepted after failed "
         "attempts; abandoned: every attempt of the run failed; unregistered: APNs said the "
         "token is dead and it was unregistered; kept: it was dead but the device had "
         "registered again since; dead: a dead-token answer with no decision recorded.",
         lambda: chart_outcomes(data)),
        ("Failure reasons over time", "Failed attempts by APNs reason; "
         f"{NO_ANSWER} is a timeout or a lost connection.", lambda: chart_failures(data)),
        ("APNs latency per run", "From sending a notification to APNs' answer: median, "
         "95th and 99th percentile of each run.", lambda: chart_latency(percentiles)),
        ("Run durations", "From a run's start to its end"
         + ("" if interval is None else f", against wakeup.interval ({interval:g} s) from "
            "the configuration; red runs took longer") + ".",
         lambda: chart_durations(data, interval)),
    ]
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>apns-relay audit report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>apns-relay audit report</h1>",
        "<p>apns-relay sends periodic background notifications through Apple's push "
        "service (APNs) to the registered iOS devices of an app, so that the app wakes and "
        "syncs. Every registration and every answer of APNs is an event in an append-only "
        "log whose events are chained by SHA-256 hashes. This report was computed from that "
        "log alone" + ("" if until_ms is None else f", up to {iso_ms(until_ms)}") + ".</p>",
        _verification_html(checked, data, span),
    ]
    for title, note, chart in sections:
        svg = chart()
        body = (f"<figure class=\"chart\">{svg}</figure>" if svg is not None
                else "<p class=\"note\">Nothing of this kind in the log.</p>")
        parts.append(f"<h2>{html.escape(title)}</h2><p class=\"note\">{html.escape(note)}"
                     f"</p>{body}")
    parts += [_tokens_html(data), _runs_html(data, percentiles), _halts_html(data),
              "</body></html>\n"]
    return "\n".join(parts)


def _verification_html(checked: Verification, data: ReportData, span: str) -> str:
    status = ("<span class=\"ok\">verified</span>" if checked.verified
              else "<span class=\"bad\">NOT verified</span>")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in checked.problems)
    return (
        "<h2>The log and its verification</h2><table>"
        f"<tr><td>events</td><td>{data.events:,} (positions 1 to {checked.last_position:,})"
        f"</td></tr><tr><td>time span</td><td>{html.escape(span)}</td></tr>"
        f"<tr><td>head (hash of the last event)</td><td><code>{checked.head or '-'}</code>"
        f"</td></tr><tr><td>status</td><td>{status}: {html.escape(checked.scope)}</td></tr>"
        "</table>" + (f"<ul>{problems}</ul>" if problems else "") +
        "<p class=\"note\">Keep the head hash elsewhere: a later report whose log contains "
        "this head at this position proves the history up to it unchanged.</p>")


def _tokens_html(data: ReportData) -> str:
    top = data.failures_by_token.most_common(TOP_TOKENS)
    if not top:
        return "<h2>Tokens with the most failures</h2><p class=\"note\">None failed.</p>"
    rows = "".join(f"<tr><td><code>{html.escape(redact(token))}</code></td><td>{count:,}</td>"
                   "</tr>" for token, count in top)
    return ("<h2>Tokens with the most failures</h2><p class=\"note\">Failed attempts per "
            "device token, tokens shortened as in the relay's logs.</p>"
            f"<table><tr><th>token</th><th>failed attempts</th></tr>{rows}</table>")


def _runs_html(data: ReportData, percentiles: dict[int, tuple[float, float, float]]) -> str:
    runs = sorted(data.runs)[-RUNS_LISTED:]
    if not runs:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("run", "started", "duration (s)", "tokens",
                                            *OUTCOMES, "p50 ms", "p95 ms", "p99 ms"))
    rows = []
    for run in runs:
        figures = data.runs[run]
        started = "-" if figures.started_ms is None else iso_ms(figures.started_ms)
        duration = figures.duration_s
        latency = percentiles.get(run)
        cells = [str(run), started, "unfinished" if duration is None else f"{duration:,.1f}",
                 f"{figures.tokens:,}", *(f"{v:,}" for v in figures.outcomes().values()),
                 *(("-",) * 3 if latency is None else (f"{v:.1f}" for v in latency))]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    shown = f"the latest {RUNS_LISTED}" if len(data.runs) > RUNS_LISTED else "all runs"
    return (f"<h2>Runs</h2><p class=\"note\">{shown}.</p><table><tr>{head}</tr>"
            + "".join(rows) + "</table>")


def _halts_html(data: ReportData) -> str:
    if not data.halts:
        return ""
    items = "".join(
        f"<li>{html.escape(str(h.get('at')))}: {html.escape(str(h.get('halt_class')))}, "
        f"APNs answered {html.escape(str(h.get('status')))} "
        f"{html.escape(str(h.get('reason')))}: {html.escape(str(h.get('message')))}</li>"
        for h in data.halts)
    return f"<h2>Halts</h2><p class=\"note\">The relay stopped itself:</p><ul>{items}</ul>"
