"""The figures behind `audit --html`, folded from the event log in one pass.

Only what the charts need is kept: per run, its times, its per-token outcomes and its
APNs latencies; the active-device count each time it changes; each failed attempt's
time and reason; failures per token. The report is built from the log alone, so every
figure here can be recomputed by anyone holding the log.

A run's outcomes are per token and disjoint, so they stack:
- delivered: accepted by APNs at the first attempt;
- retried: accepted after one or more failed attempts;
- abandoned: every attempt of the run failed (transient failures);
- unregistered: a dead-token verdict, and the token was unregistered (`device_unregistered`
  of the run);
- kept: a dead-token verdict, but the device registered again after it
  (`unregister_skipped` of the run);
- dead: a dead-token verdict with no unregistration decision recorded in the run.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from events import types as ev
from events.projection import time_ms

OUTCOMES = ("delivered", "retried", "abandoned", "dead", "unregistered", "kept")
DEAD_TOKEN = "dead_token"  # the verdict of a dead-token answer (relay/apns/reasons.py)
NO_ANSWER = "(no answer)"  # a failed attempt without an APNs reason: timeout, connection lost
FETCH_ROWS = 5_000  # rows per round trip of the server-side cursor


@dataclass
class RunFigures:
    started_ms: int | None = None
    finished_ms: int | None = None
    tokens: int = 0
    delivered: int = 0
    retried: int = 0
    abandoned: int = 0
    dead_verdicts: int = 0
    unregistered: int = 0
    kept: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))

    @property
    def dead(self) -> int:
        """Dead-token verdicts the run recorded no decision for."""
        return max(0, self.dead_verdicts - self.unregistered - self.kept)

    def outcomes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in OUTCOMES}

    @property
    def duration_s(self) -> float | None:
        if self.started_ms is None or self.finished_ms is None:
            return None
        return (self.finished_ms - self.started_ms) / 1000


@dataclass
class ReportData:
    events: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    runs: dict[int, RunFigures] = field(default_factory=dict)
    # (time, active devices) at every change of the count
    active_at: array[int] = field(default_factory=lambda: array("q"))
    active_count: array[int] = field(default_factory=lambda: array("q"))
    failures: dict[str, array[int]] = field(default_factory=dict)  # reason -> times (ms)
    failures_by_token: Counter[str] = field(default_factory=Counter)
    halts: list[dict[str, Any]] = field(default_factory=list)

    def run(self, number: int) -> RunFigures:
        figures = self.runs.get(number)
        if figures is None:
            figures = self.runs[number] = RunFigures()
        return figures


class Folder:
    """Feeds events, in log order, into a `ReportData`."""

    def __init__(self) -> None:
        self.data = ReportData()
        self._active: dict[str, bool] = {}
        self._count = 0

    def apply(self, type_: str, doc: dict[str, Any]) -> None:
        data = self.data
        data.events += 1
        at = doc.get("at")
        at_ms = time_ms(at) if isinstance(at, str) else None
        if at_ms is not None:
            if data.first_ms is None:
                data.first_ms = at_ms
            data.last_ms = at_ms
        run: Any = doc.get("run")
        if type_ == ev.NOTIFICATION_DELIVERED:
            figures = data.run(run)
            if doc.get("attempt", 1) > 1:
                figures.retried += 1
            else:
                figures.delivered += 1
            figures.latencies_ms.append(doc.get("latency_ms") or 0.0)
        elif type_ == ev.NOTIFICATION_FAILED:
            figures = data.run(run)
            if doc.get("status") is not None and doc.get("latency_ms") is not None:
                figures.latencies_ms.append(doc["latency_ms"])
            if doc.get("verdict") == DEAD_TOKEN:
                figures.dead_verdicts += 1
            reason = doc.get("reason") or NO_ANSWER
            times = data.failures.get(reason)
            if times is None:
                times = data.failures[reason] = array("q")
            if at_ms is not None:
                times.append(at_ms)
            data.failures_by_token[doc.get("token") or ""] += 1
        elif type_ == ev.DEVICE_REGISTERED:
            self._set_active(doc.get("token"), True, at_ms)
        elif type_ == ev.DEVICE_UNREGISTERED:
            self._set_active(doc.get("token"), False, at_ms)
            if run is not None:
                data.run(run).unregistered += 1
        elif type_ == ev.UNREGISTER_SKIPPED:
            if run is not None:
                data.run(run).kept += 1
        elif type_ == ev.NOTIFICATION_ABANDONED:
            data.run(run).abandoned += 1
        elif type_ == ev.RUN_STARTED:
            figures = data.run(run)
            figures.started_ms, figures.tokens = at_ms, doc.get("tokens") or 0
        elif type_ == ev.RUN_FINISHED:
            data.run(run).finished_ms = at_ms
        elif type_ == ev.RELAY_HALTED:
            data.halts.append(doc)

    def _set_active(self, token: object, active: bool, at_ms: int | None) -> None:
        if not isinstance(token, str) or self._active.get(token, False) == active:
            return
        self._active[token] = active
        self._count += 1 if active else -1
        if at_ms is not None:
            self.data.active_at.append(at_ms)
            self.data.active_count.append(self._count)


def fold_rows(rows: Iterable[tuple[str, bytes]]) -> ReportData:
    folder = Folder()
    loads, refused = orjson.loads, orjson.JSONDecodeError
    for type_, body in rows:
        try:
            doc = loads(body)
        except refused:  # not JSON orjson reads: the verification reports the event
            continue
        if type(doc) is dict:
            folder.apply(type_, doc)
    return folder.data


def collect(conn: psycopg.Connection[Any], last_position: int) -> ReportData:
    """The figures of events 1..last_position, read in the connection's transaction
    (the snapshot the verification used)."""
    with conn.cursor(name="relay_report") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute("SELECT type, body FROM events WHERE position <= %s ORDER BY position",
                    (last_position,), binary=True)
        return fold_rows(cur)
