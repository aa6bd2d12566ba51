"""The events table itself: PostgreSQL's guard, and tampering caught by `audit --verify`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from events import codec
from events import replay as replay_engine
from events import types as ev
from events.audit import audit_main
from events.journal import Journal
from relay.database import connect

T0 = 1_700_000_000_000
EVENTS = 12


def events() -> list[ev.Event]:
    tokens = [f"{i:064x}" for i in range(4)]
    return ([ev.device_registered(t, T0 + i) for i, t in enumerate(tokens)]
            + [ev.run_started(1, T0 + 10, 4)]
            + [ev.notification_delivered(1, t, T0 + 20 + i, attempt=1, apns_id=f"id{i}",
                                         status=200, latency_ms=3.25)
               for i, t in enumerate(tokens)]
            + [ev.device_unregistered(tokens[0], T0 + 30, "api"),
               ev.device_registered(tokens[0], T0 + 40),
               ev.run_finished(1, T0 + 50, tokens=4, delivered=4, failed=0, abandoned=0,
                               dead=0, unregistered=0, kept=0)])


@pytest.fixture
def log(dsn: str) -> Iterator[str]:
    """A database holding a short, valid log written by the Journal."""
    journal = Journal(dsn, max_delay=0.001)
    journal.start()
    try:
        assert journal.append(events()).result(10) == list(range(1, EVENTS + 1))
    finally:
        journal.stop(5)
    yield dsn


def verify(dsn: str, capsys: pytest.CaptureFixture[str], *args: str
           ) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    status = audit_main(dsn, ["--verify", "--json", *args])
    return status, json.loads(capsys.readouterr().out)


def as_superuser_without_guard(admin_dsn: str, dsn: str, *statements: str) -> None:
    """What only the table owner or a superuser can do: silence the guard and rewrite."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
        for statement in statements:
            conn.execute(statement)
        for trigger in ("events_append_only", "events_advance_head"):
            conn.execute(f"ALTER TABLE events ENABLE ALWAYS TRIGGER {trigger}")


# --- the guard ------------------------------------------------------------------------


@pytest.mark.parametrize("statement", [
    "UPDATE events SET type = 'device_registered' WHERE position = 3",
    "DELETE FROM events WHERE position = 3",
    "DELETE FROM events WHERE position = -1",  # even when no row matches
    "TRUNCATE events",
])
def test_the_relays_connection_cannot_rewrite_events(log: str, statement: str) -> None:
    with connect(log) as conn, pytest.raises(psycopg.errors.RestrictViolation,
                                             match="append-only"):
        conn.execute(statement)


def test_replica_mode_does_not_silence_the_guard(log: str) -> None:
    with connect(log) as conn:
        conn.execute("SET session_replication_role = replica")
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute("DELETE FROM events")


@pytest.mark.parametrize("statement", [
    "UPDATE log_head SET position = position - 1",
    "UPDATE log_head SET hash = sha256(hash)",
    "DELETE FROM log_head",
    "TRUNCATE log_head",
    "INSERT INTO log_head (id, position, hash) VALUES (false, 0, sha256(''))",
])
def test_the_head_only_follows_the_log(log: str, statement: str) -> None:
    with connect(log) as conn, pytest.raises(psycopg.errors.RestrictViolation):
        conn.execute(statement)


def insert(dsn: str, position: int, body: bytes, hash_: bytes) -> None:
    with connect(dsn) as conn:
        conn.execute("INSERT INTO events (position, type, body, hash)"
                     " VALUES (%s, 'relay_halted', %s, %s)", (position, body, hash_))


def head(dsn: str) -> tuple[int, bytes]:
    with connect(dsn) as conn:
        row = conn.execute("SELECT position, hash FROM log_head").fetchone()
    assert row is not None
    return row[0], bytes(row[1])


def test_an_insert_must_extend_the_chain_at_the_head(log: str) -> None:
    position, previous = head(log)
    data = ev.relay_halted(T0, halt_class="relay_bug", reason=None, status=None,
                           message="x").data
    body = codec.canonical_bytes(position + 1, ev.RELAY_HALTED, data)
    with pytest.raises(psycopg.errors.RestrictViolation, match="not contiguous"):
        gap = codec.canonical_bytes(position + 2, ev.RELAY_HALTED, data)
        insert(log, position + 2, gap, codec.chain_hash(previous, gap))
    with pytest.raises(psycopg.errors.RestrictViolation, match="hash chain"):
        insert(log, position + 1, body, codec.chain_hash(codec.GENESIS_HASH, body))
    insert(log, position + 1, body, codec.chain_hash(previous, body))
    assert head(log) == (position + 1, codec.chain_hash(previous, body))


# --- tampering, caught by --verify ---------------------------------------------------------


def test_an_untouched_log_verifies(log: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = verify(log, capsys)
    assert status == 0
    assert report["verified"] is True and report["first_bad_position"] is None
    assert report["events"] == EVENTS
    assert report["head"] == head(log)[1].hex()


def _changed_body(position: int) -> str:
    return ("UPDATE events SET body = convert_to(replace(convert_from(body, 'UTF8'),"
            f" '\"id1\"', '\"id9\"'), 'UTF8') WHERE position = {position}")


TAMPERING: dict[str, tuple[Callable[[], list[str]], int]] = {
    "body changed": (lambda: [_changed_body(7)], 7),
    "row deleted": (lambda: ["DELETE FROM events WHERE position = 6"], 6),
    "two rows swapped": (lambda: [
        "UPDATE events SET position = 1000 WHERE position = 8",
        "UPDATE events SET position = 8 WHERE position = 9",
        "UPDATE events SET position = 9 WHERE position = 1000"], 8),
    "tail truncated": (lambda: [f"DELETE FROM events WHERE position > {EVENTS - 2}"],
                       EVENTS - 1),
    "token column changed": (lambda: [
        f"UPDATE events SET token = '{'ff' * 32}' WHERE position = 3"], 3),
    "first row deleted": (lambda: ["DELETE FROM events WHERE position = 1"], 1),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_is_reported_at_that_row(log: str, admin_dsn: str, case: str,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    statements, bad = TAMPERING[case]
    as_superuser_without_guard(admin_dsn, log, *statements())
    status, report = verify(log, capsys)
    assert status == 1
    assert report["verified"] is False
    assert report["first_bad_position"] == bad, report["problems"]
    # The same verdict from worker processes each checking a slice of 5 events.
    monkeypatch.setattr(replay_engine, "MIN_SLICE", 5)
    assert verify(log, capsys, "--jobs", "2") == (status, report)


def test_worker_processes_replay_to_the_same_summary(
        log: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_engine, "MIN_SLICE", 2)
    alone, together = verify(log, capsys, "--jobs", "1"), verify(log, capsys, "--jobs", "3")
    assert alone == together
    assert alone[0] == 0 and alone[1]["events"] == EVENTS


def test_a_cache_edited_behind_the_relays_back_is_caught_and_rebuilt(
        log: str, capsys: pytest.CaptureFixture[str]) -> None:
    from events.audit import rebuild_main

    token = f"{0:064x}"
    with connect(log) as conn:
        conn.execute("UPDATE devices SET registered_at_ms = registered_at_ms - 10000"
                     " WHERE token = %s", (token,))
        conn.execute("UPDATE runs SET delivered = 3")
    status, report = verify(log, capsys)
    assert status == 1
    # The last event that decided that device's row is its re-registration, at 11.
    assert report["first_bad_position"] == 11
    assert any("registered_at_ms" in p["problem"] for p in report["problems"])
    assert any("run 1" in p["problem"] for p in report["problems"])
    assert rebuild_main(log, []) == 0
    status, report = verify(log, capsys)
    assert (status, report["verified"]) == (0, True)
    with connect(log) as conn:
        row = conn.execute("SELECT registered_at_ms FROM devices WHERE token = %s",
                           (token,)).fetchone()
    assert row == (T0 + 40,)


def test_a_link_broken_inside_a_batch_is_caught_by_verify(
        log: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The database checks where a batch joins the chain; the links inside it are the
    writer's arithmetic, which `--verify` recomputes (schema/001_event_log.sql)."""
    position, previous = head(log)
    data = ev.relay_halted(T0, halt_class="relay_bug", reason=None, status=None,
                           message="x").data
    first = codec.canonical_bytes(position + 1, ev.RELAY_HALTED, data)
    second = codec.canonical_bytes(position + 2, ev.RELAY_HALTED, data)
    first_hash = codec.chain_hash(previous, first)
    with connect(log) as conn:
        conn.execute("INSERT INTO events (position, type, body, hash)"
                     " VALUES (%s, 'relay_halted', %s, %s), (%s, 'relay_halted', %s, %s)",
                     (position + 1, first, first_hash,
                      position + 2, second, codec.chain_hash(codec.GENESIS_HASH, second)))
    status, report = verify(log, capsys)
    assert (status, report["verified"]) == (1, False)
    assert report["first_bad_position"] == position + 2, report["problems"]
