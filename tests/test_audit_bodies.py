"""The audit names every bad body at its position, however well it is chained, and never
crashes: missing fields, wrong JSON types, bytes that are not the canonical encoding."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from events import codec
from events import types as ev
from events.audit import audit_main
from events.batch_sql import append_bulk

T0 = 1_760_000_000_000
A = "aa" * 32


def append_raw(dsn: str, body_at: Any) -> int:
    """Append one row whose body is whatever `body_at(position)` returns, correctly chained
    (an INSERT is all the guard allows, and all this needs); returns its position."""
    with psycopg.connect(dsn) as conn:
        position, previous = conn.execute(
            "SELECT position, hash FROM log_head FOR UPDATE").fetchone() or (0, b"")
        position += 1
        body: bytes = body_at(position)
        doc = json.loads(body)
        conn.execute("INSERT INTO events (position, type, token, run, body, hash)"
                     " VALUES (%s, %s, %s, %s, %s, %s)",
                     (position, doc.get("type"), doc.get("token"),
                      doc.get("run") if type(doc.get("run")) is int else None, body,
                      codec.chain_hash(bytes(previous), body)))
    return int(position)


def delivered(position: int, **change: Any) -> bytes:
    data = dict(ev.notification_delivered(1, A, T0 + 2, attempt=1, apns_id="x", status=200,
                                          latency_ms=1.5).data)
    data.update(change)
    return codec.canonical_bytes(position, ev.NOTIFICATION_DELIVERED, data)


def run_json(dsn: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    capsys.readouterr()
    status = audit_main(dsn, ["--json", *args])
    return status, json.loads(capsys.readouterr().out)


@pytest.fixture
def log(dsn: str) -> str:
    append_bulk(dsn, [ev.device_registered(A, T0), ev.run_started(1, T0 + 1, 1)])
    return dsn


@pytest.mark.parametrize(("body_at", "named"), [
    (lambda p: codec.canonical_bytes(p, ev.DEVICE_REGISTERED, {"at": ev.iso_ms(T0)}),
     "a device_registered that lacks token"),
    (lambda p: delivered(p, attempt=5.0), "whose attempt is 5.0"),
    (lambda p: delivered(p, status=True), "whose status is true"),
    (lambda p: delivered(p).replace(b'"attempt":1', b'"attempt": 1'), "not the canonical"),
    (lambda p: delivered(p).replace(b'"at":', b'"at" :'), "not the canonical"),
    (lambda p: delivered(p, latency_ms=1.25).replace(b"1.25", b"1.250"), "not the canonical"),
    (lambda p: delivered(p, surprise=1), "has unknown field(s) surprise"),
    (lambda p: codec.canonical_bytes(p, "device_renamed", {"token": A}),
     "unknown event type 'device_renamed'"),
])
def test_a_chained_but_malformed_event_is_named_at_its_position(
        log: str, capsys: pytest.CaptureFixture[str], body_at: Any, named: str) -> None:
    bad = append_raw(log, body_at)
    append_bulk(log, [ev.device_registered("bb" * 32, T0 + 9)])  # the log goes on after it
    status, report = run_json(log, capsys, "--verify")
    assert status == 1 and report["first_bad_position"] == bad
    assert any(p["position"] == bad and named in p["problem"] for p in report["problems"]), \
        report["problems"]


def test_run_true_is_not_run_1(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = append_raw(log, lambda p: delivered(p, run=True))
    status, report = run_json(log, capsys, "--verify")
    assert status == 1 and report["first_bad_position"] == bad


def test_without_verify_an_unreadable_event_is_reported_not_a_traceback(
        log: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = append_raw(log, lambda p: codec.canonical_bytes(
        p, ev.RUN_FINISHED, {"run": 1, "at": ev.iso_ms(T0 + 5)}))  # no counts at all
    status, report = run_json(log, capsys)
    assert status == 1 and report["problems"][0]["position"] == bad
    assert "cannot be read" in report["problems"][0]["problem"]
    status, report = run_json(log, capsys, "--verify")
    assert status == 1 and report["first_bad_position"] == bad
    status, report = run_json(log, capsys, "--token", A)
    assert status == 0 and len(report["history"]) == 1


def test_the_command_line_prints_the_bad_row_and_exits_1(dsn: str, tmp_path: Any) -> None:
    append_bulk(dsn, [ev.device_registered(A, T0)])
    bad = append_raw(dsn, lambda p: delivered(p, attempt=5.0))
    config = tmp_path / "relay.yaml"
    config.write_text(f"database:\n  dsn: '{dsn}'\n  data_dir: '{tmp_path}'\n")
    done = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "audit",
                           "--verify"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"first bad position {bad}" in done.stdout and "Traceback" not in done.stderr
    assert "whose attempt is 5.0" in done.stdout
