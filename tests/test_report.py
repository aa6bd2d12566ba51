"""`python -m relay audit --html`: the figures, the page, and the page in a real browser."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from browser import open_in_chromium

from events import types as ev
from events.audit import audit_main
from events.batch_sql import append_bulk
from events.report_data import fold_rows
from relay.tokens import redact

pytest.importorskip("matplotlib", reason="the `report` extra (matplotlib) is not installed")

T0 = 1_770_000_000_000
MINUTE, HOUR = 60_000, 3_600_000
TOKENS = [f"{n:064x}" for n in range(1, 8)]
INTERVAL = 3600.0


def _failed(run: int, token: str, at: int, attempt: int, status: int, reason: str,
            verdict: str, retry: bool) -> ev.Event:
    return ev.notification_failed(run, token, at, attempt=attempt, apns_id=f"id-{at}",
                                  status=status, reason=reason, verdict=verdict,
                                  apple_timestamp_ms=None, latency_ms=40.0,
                                  next_attempt_at_ms=at + MINUTE if retry else None)


def _delivered(run: int, token: str, at: int, attempt: int = 1,
               latency: float = 10.0) -> ev.Event:
    return ev.notification_delivered(run, token, at, attempt=attempt, apns_id=f"id-{at}",
                                     status=200, latency_ms=latency)


def history() -> list[ev.Event]:
    """Six devices; run 1 ends one token in each outcome and overruns the interval; run 2
    delivers to the three left; a halt; a seventh device."""
    t = TOKENS
    r1 = T0 + HOUR
    return [
        *(ev.device_registered(token, T0 + i) for i, token in enumerate(t[:6])),
        ev.run_started(1, r1, 6),
        _delivered(1, t[0], r1 + 1),
        _failed(1, t[1], r1 + 2, 1, 429, "TooManyRequests", "transient", retry=True),
        _delivered(1, t[1], r1 + MINUTE + 2, attempt=2, latency=30.0),
        _failed(1, t[2], r1 + 3, 1, 503, "ServiceUnavailable", "transient", retry=True),
        _failed(1, t[2], r1 + MINUTE + 3, 2, 503, "ServiceUnavailable", "transient",
                retry=False),
        ev.notification_abandoned(1, t[2], r1 + MINUTE + 3, attempts=2, apns_id="a",
                                  last_reason="ServiceUnavailable"),
        _failed(1, t[3], r1 + 4, 1, 410, "Unregistered", "dead_token", retry=False),
        ev.device_unregistered(t[3], r1 + 5, "Unregistered", run=1),
        _failed(1, t[4], r1 + 6, 1, 410, "Unregistered", "dead_token", retry=False),
        ev.unregister_skipped(t[4], r1 + 7, "Unregistered", verdict_at_ms=r1 + 6,
                              registered_at_ms=r1 + 6, why="registered again", run=1),
        _failed(1, t[5], r1 + 8, 1, 400, "BadDeviceToken", "dead_token", retry=False),
        ev.run_finished(1, r1 + 90 * MINUTE, tokens=6, delivered=2, failed=5, abandoned=1,
                        dead=3, unregistered=1, kept=1),
        ev.run_started(2, T0 + 3 * HOUR, 5),
        *(_delivered(2, token, T0 + 3 * HOUR + i + 1) for i, token in enumerate(t[:3])),
        ev.run_finished(2, T0 + 3 * HOUR + 10 * MINUTE, tokens=5, delivered=3, failed=0,
                        abandoned=0, dead=0, unregistered=0, kept=0),
        ev.relay_halted(T0 + 4 * HOUR, halt_class="configuration", reason="TopicDisallowed",
                        status=400, message="check apns.topic"),
        ev.device_registered(t[6], T0 + 5 * HOUR),
    ]


def _bodies(events: list[ev.Event]) -> list[tuple[str, bytes]]:
    from events import codec

    return [(e.type, codec.canonical_bytes(i, e.type, e.data))
            for i, e in enumerate(events, start=1)]


def test_each_token_of_a_run_has_exactly_one_outcome() -> None:
    data = fold_rows(_bodies(history()))
    assert data.runs[1].outcomes() == {"delivered": 1, "retried": 1, "abandoned": 1,
                                       "dead": 1, "unregistered": 1, "kept": 1}
    assert data.runs[2].outcomes()["delivered"] == 3
    assert data.runs[1].duration_s == 90 * 60
    assert list(data.active_count) == [1, 2, 3, 4, 5, 6, 5, 6]
    assert {r: len(times) for r, times in data.failures.items()} == {
        "TooManyRequests": 1, "ServiceUnavailable": 2, "Unregistered": 2,
        "BadDeviceToken": 1}
    assert data.failures_by_token.most_common(1) == [(TOKENS[2], 2)]
    # latencies: every answered attempt (the 5 failures with a status and 5 deliveries)
    assert len(data.runs[1].latencies_ms) == 8 and len(data.runs[2].latencies_ms) == 3


def _report(dsn: str, path: Path, *argv: str) -> tuple[int, str]:
    status = audit_main(dsn, ["--html", str(path), *argv], interval=INTERVAL)
    return status, path.read_text(encoding="utf-8")


def test_the_report_stands_alone_and_says_what_the_log_says(dsn: str, tmp_path: Path) -> None:
    append_bulk(dsn, history())
    status, page = _report(dsn, tmp_path / "report.html")
    assert status == 0
    assert page.count("<svg") == 5
    assert "verified</span>: hash chain, positions and head" in page
    # nothing to fetch: no script, style sheet, image or font from anywhere
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\((?!#)", page)
    assert not re.search(r"(src|href)=\"(?!#)", page)
    assert TOKENS[2] not in page and redact(TOKENS[2]) in page
    assert "TopicDisallowed" in page  # the halt
    assert "wakeup.interval (3600 s)" in page


def test_until_covers_the_log_up_to_that_time(dsn: str, tmp_path: Path) -> None:
    append_bulk(dsn, history())
    until = ev.iso_ms(T0 + 2 * HOUR + 1)
    status, page = _report(dsn, tmp_path / "report.html", "--until", until)
    assert status == 0
    assert f"up to {until}" in page
    assert ">2</td><td>" not in page.split("<h2>Runs</h2>")[1]  # run 2 started later
    assert "TopicDisallowed" not in page


def test_a_rewritten_log_is_reported_not_verified(dsn: str, tmp_path: Path) -> None:
    append_bulk(dsn, history())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
        conn.execute("UPDATE events SET hash = sha256(hash) WHERE position = 3")
        conn.execute("ALTER TABLE events ENABLE TRIGGER USER")
    status, page = _report(dsn, tmp_path / "report.html")
    assert status == 1
    assert "NOT verified" in page and "event 3: hash does not match" in page


def test_the_report_draws_in_headless_chromium(dsn: str, tmp_path: Path) -> None:
    """No console error, no request beyond the file, marks drawn in every chart."""
    append_bulk(dsn, history())
    path = tmp_path / "report.html"
    assert _report(dsn, path)[0] == 0
    seen = open_in_chromium(path, tmp_path / "chromium", screenshot=tmp_path / "report.png")
    assert seen.errors == []
    assert seen.requests == [path.as_uri()]
    assert len(seen.charts) == 5
    for chart, marks in seen.charts.items():
        assert marks > 0, f"chart {chart} drew nothing"
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_the_command_line_draws_the_configured_interval(dsn: str, tmp_path: Path) -> None:
    append_bulk(dsn, history())
    config = tmp_path / "relay.yaml"
    config.write_text(f"database:\n  dsn: '{dsn}'\nwakeup:\n  interval: 30m\n")
    page = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "audit", "--html",
                           str(page)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {page}: 26 events, 2 runs, log verified")
    assert "wakeup.interval (1800 s)" in page.read_text(encoding="utf-8")


def test_a_report_into_a_missing_directory_is_refused_before_any_work(
        dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "nowhere" / "report.html"
    assert audit_main(dsn, ["--html", str(target)]) == 2
    assert f"cannot write {target}: no directory" in capsys.readouterr().err


def test_html_with_token_or_json_is_refused_before_the_database(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("database:\n  dsn: 'postgresql://relay@127.0.0.1:9/nowhere'\n")
    for extra in (["--token", TOKENS[0]], ["--json"]):
        done = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "audit",
                               "--html", str(tmp_path / "r.html"), *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "cannot be combined with --token or --json" in done.stderr
