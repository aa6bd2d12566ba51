"""`python -m relay audit` / `rebuild` (audit_main, rebuild_main) over a real log."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from events import audit
from events import replay as replay_engine
from events import types as ev
from events.audit import audit_main, rebuild_main
from events.batch_sql import append_bulk
from events.journal import Journal
from relay.database import connect

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z
A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


SIMULATED = {"environment": "simulator", "endpoint": "https://127.0.0.1:8443"}


def the_log() -> list[ev.Event]:
    return [
        ev.device_registered(A, T0), ev.device_registered(B, T0 + 1),
        ev.device_registered(C, T0 + 2),
        ev.run_started(1, T0 + 1000, 3),
        ev.notification_delivered(1, A, T0 + 1001, attempt=1, apns_id="a1", status=200,
                                  latency_ms=10.0),
        ev.notification_failed(1, B, T0 + 1002, attempt=1, apns_id="b1", status=503,
                               reason="ServiceUnavailable", verdict="transient",
                               apple_timestamp_ms=None, latency_ms=5.0,
                               next_attempt_at_ms=T0 + 60_000),
        ev.notification_failed(1, C, T0 + 1003, attempt=1, apns_id="c1", status=410,
                               reason="Unregistered", verdict="dead_token",
                               apple_timestamp_ms=T0 - 5000, latency_ms=5.0,
                               next_attempt_at_ms=None),
        ev.device_unregistered(C, T0 + 1004, "Unregistered", apple_timestamp_ms=T0 - 5000,
                               run=1, apns_id="c1"),
        ev.notification_delivered(1, B, T0 + 60_001, attempt=2, apns_id="b2", status=200,
                                  latency_ms=10.0),
        ev.run_finished(1, T0 + 60_002, tokens=3, delivered=2, failed=2, abandoned=0,
                        dead=1, unregistered=1, kept=0),
        ev.run_started(2, T0 + 3_600_000, 2, apns=SIMULATED),
    ]


@pytest.fixture
def log(dsn: str) -> Iterator[str]:
    journal = Journal(dsn, max_delay=0.001)
    journal.start()
    try:
        journal.append(the_log()).result(10)
    finally:
        journal.stop(5)
    yield dsn


def audit_json(dsn: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    capsys.readouterr()
    status = audit_main(dsn, ["--json", *args])
    return status, json.loads(capsys.readouterr().out)


def test_summary(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = audit_json(log, capsys)
    assert status == 0
    assert report["events"] == 11
    with connect(log) as conn:
        head = conn.execute("SELECT hash FROM log_head").fetchone()
    assert head is not None and report["head"] == bytes(head[0]).hex()
    assert report["devices"] == {"active": 2, "unregistered": 1}
    assert report["runs"] == [
        {"run": 1, "started_at": ev.iso_ms(T0 + 1000), "finished_at": ev.iso_ms(T0 + 60_002),
         "tokens": 3, "delivered": 2, "failed": 2, "abandoned": 0, "dead": 1,
         "unregistered": 1, "kept": 0, "apns": None, "simulated": False, "processes": []},
        {"run": 2, "started_at": ev.iso_ms(T0 + 3_600_000), "finished_at": None,
         "tokens": 2, "delivered": 0, "failed": 0, "abandoned": 0, "dead": 0,
         "unregistered": 0, "kept": 0, "apns": SIMULATED, "simulated": True,
         "processes": []},
    ]
    assert "verified" not in report


def test_verify_adds_the_verdict(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = audit_json(log, capsys, "--verify")
    assert (status, report["verified"], report["first_bad_position"]) == (0, True, None)


def test_until_replays_a_prefix(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = audit_json(log, capsys, "--until", ev.iso_ms(T0 + 1002), "--verify")
    assert status == 0 and report["verified"] is True
    assert report["events"] == 6
    assert report["runs"][0]["finished_at"] is None
    epoch = str((T0 + 2) / 1000)
    assert audit_json(log, capsys, "--until", epoch)[1]["events"] == 3


@pytest.mark.parametrize("until", [T0 + 1, T0 + 1002, T0 + 60_001])
def test_worker_processes_agree_with_one_process(log: str, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 until: int) -> None:
    """Slices of 4 events: --until stops in this process's slice (1-4) or in a worker's
    (5-8, 9-11); a token's history spans all three."""
    monkeypatch.setattr(replay_engine, "MIN_SLICE", 4)
    for args in (["--until", ev.iso_ms(until), "--verify"], ["--token", B, "--verify"]):
        alone = audit_json(log, capsys, *args, "--jobs", "1")
        assert audit_json(log, capsys, *args, "--jobs", "3") == alone
        assert alone[0] == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_a_terminal_shows_a_progress_bar_that_reaches_the_end(
        log: str, monkeypatch: pytest.MonkeyPatch, jobs: str) -> None:
    """Events folded here and by worker processes all count (slices of 4 with --jobs 3)."""
    monkeypatch.setattr(audit, "PROGRESS_MIN_EVENTS", 1)
    monkeypatch.setattr(replay_engine, "MIN_SLICE", 4)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert audit_main(log, ["--verify", "--jobs", jobs]) == 0
    assert "replaying" in terminal.getvalue()
    last = terminal.getvalue().rstrip().splitlines()[-1]
    assert "100%" in last and "11.0/11.0" in last, last


def test_token_history(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = audit_json(log, capsys, "--token", C.upper())
    assert status == 0
    assert report["token"] == C and report["active"] is False
    history = report["history"]
    assert [h["type"] for h in history] == [ev.DEVICE_REGISTERED, ev.NOTIFICATION_FAILED,
                                            ev.DEVICE_UNREGISTERED]
    assert [h["position"] for h in history] == [3, 7, 8]
    assert history[1]["reason"] == "Unregistered" and history[1]["at"] == ev.iso_ms(T0 + 1003)
    # The same with --verify (a full replay) gives the same history.
    status, verified = audit_json(log, capsys, "--token", C, "--verify")
    assert status == 0 and verified["history"] == history and verified["verified"] is True


def test_text_output_is_readable(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert audit_main(log, ["--verify"]) == 0
    out = capsys.readouterr().out
    assert "events        11" in out
    assert "2 active, 1 unregistered" in out
    assert "run 1:" in out and "verified      yes" in out
    assert "SIMULATED (built-in APNs simulator at https://127.0.0.1:8443)" in out
    assert audit_main(log, ["--token", A]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"token {A}: active, 2 events")


def test_usage_errors_exit_2(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_main(log, ["--until", "yesterday"]) == 2
    assert audit_main(log, ["--token", "xyz"]) == 2
    assert audit_main(log, ["--bogus"]) == 2
    assert "--token" in capsys.readouterr().err


def test_empty_log(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = audit_json(dsn, capsys, "--verify")
    assert status == 0
    assert report["events"] == 0 and report["head"] is None and report["runs"] == []


def test_rebuild_regenerates_deleted_caches(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    with connect(log) as conn:
        before = conn.execute("SELECT * FROM devices ORDER BY token").fetchall()
        conn.execute("DELETE FROM devices")
        conn.execute("INSERT INTO runs (run) VALUES (99)")
    assert audit_json(log, capsys, "--verify")[0] == 1
    assert rebuild_main(log, []) == 0
    assert "rebuilt devices (3 rows)" in capsys.readouterr().out
    with connect(log) as conn:
        assert conn.execute("SELECT * FROM devices ORDER BY token").fetchall() == before
    assert audit_json(log, capsys, "--verify")[0] == 0


def test_bodies_beyond_what_orjson_reads_verify(dsn: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """JSON allows integers beyond 64 bits and the codec writes them; the audit reads them."""
    journal = Journal(dsn, max_delay=0.001)
    journal.start()
    try:
        journal.append([ev.relay_halted(T0, halt_class="relay_bug", reason=None, status=2**70,
                                        message="été"), ev.device_registered(A, T0)]).result(10)
    finally:
        journal.stop(5)
    status, report = audit_json(dsn, capsys, "--verify")
    assert report["problems"] == []
    assert (status, report["verified"], report["events"]) == (0, True, 2)


def test_text_output_names_the_processes_that_drove_a_run(
        dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Several relays shared run 1: the text summary says who drove how many shards, as
    --json does in full."""
    events = [
        ev.device_registered(A, T0), ev.device_registered(B, T0 + 1),
        ev.shard_leased(T0 + 2, process="h1:10:x", host="h1", shard=0, epoch=1, took_from=None),
        ev.shard_leased(T0 + 3, process="h2:20:y", host="h2", shard=1, epoch=1, took_from=None),
        ev.run_started(1, T0 + 1000, 2),
        ev.notification_delivered(1, A, T0 + 1001, attempt=1, apns_id="a1", status=200,
                                  latency_ms=1.0, fence=(0, 1)),
        ev.notification_delivered(1, B, T0 + 1002, attempt=1, apns_id="b1", status=200,
                                  latency_ms=1.0, fence=(1, 1)),
        ev.run_finished(1, T0 + 1003, tokens=2, delivered=2, failed=0, abandoned=0,
                        dead=0, unregistered=0, kept=0),
    ]
    assert append_bulk(dsn, events) == len(events)  # as written: no lease table to fence by
    capsys.readouterr()
    assert audit_main(dsn, ["--verify"]) == 0
    out = capsys.readouterr().out
    assert "    driven by h1:10:x (1 shards), h2:20:y (1 shards)\n" in out
    status, report = audit_json(dsn, capsys)
    assert status == 0
    assert [p["process"] for p in report["runs"][0]["processes"]] == ["h1:10:x", "h2:20:y"]
