"""A run's dead tokens counted three ways (dead, unregistered, kept), also for logs
written before run_finished carried the three: the fold upcasts the old shape and
migration 003 brings old `runs` rows to what the fold says."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from events import codec
from events import types as ev
from events.audit import audit_main
from events.journal import Journal
from events.projection import State
from relay.database import apply_migrations, migrations

T0 = 1_700_000_000_000
A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


def old_run(run: int = 1) -> list[ev.Event]:
    """A run as the relay logged it before run_finished v2: its "unregistered" counted the
    two dead-token verdicts, although one of the two devices was kept."""
    def dead(token: str, at: int) -> ev.Event:
        return ev.notification_failed(run, token, at, attempt=1, apns_id="x", status=410,
                                      reason="Unregistered", verdict="dead_token",
                                      apple_timestamp_ms=T0, latency_ms=1.0,
                                      next_attempt_at_ms=None)
    return [
        ev.device_registered(A, T0 - 10_000), ev.device_registered(B, T0 + 50_000),
        ev.device_registered(C, T0 - 10_000),
        ev.run_started(run, T0 + 100_000, 3),
        ev.notification_delivered(run, C, T0 + 100_001, attempt=1, apns_id="c", status=200,
                                  latency_ms=1.0),
        dead(A, T0 + 100_002),
        ev.device_unregistered(A, T0 + 100_003, "Unregistered", apple_timestamp_ms=T0, run=run),
        dead(B, T0 + 100_004),
        ev.unregister_skipped(B, T0 + 100_005, "Unregistered", verdict_at_ms=T0,
                              registered_at_ms=T0 + 50_000, why="registered again", run=run),
        ev.Event(ev.RUN_FINISHED, {"run": run, "at": ev.iso_ms(T0 + 100_006), "tokens": 3,
                                   "delivered": 1, "failed": 2, "abandoned": 0,
                                   "unregistered": 2}),
    ]


EXPECTED = (T0 + 100_000, T0 + 100_006, 3, 1, 2, 0, 2, 1, 1)  # dead 2, unregistered 1, kept 1


def test_an_old_run_finished_is_upcast_and_its_counts_come_from_the_events() -> None:
    events = old_run()
    state = State()
    for event in events:
        state.apply(event.type, event.data)
    assert state.runs[1] == EXPECTED
    for cut in range(len(events) + 1):  # slices folded apart and merged: the same
        first, second = State(), State(patch=True)
        for event in events[:cut]:
            first.apply(event.type, event.data)
        for event in events[cut:]:
            second.apply(event.type, event.data)
        first.merge(second)
        assert first.runs[1] == EXPECTED, cut


def test_old_runs_replay_verify_and_report_three_counts(
        dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    journal = Journal(dsn)
    journal.start()
    try:
        journal.append(old_run()).result(10)
    finally:
        journal.stop(5)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT dead, unregistered, kept FROM runs").fetchall() == [(2, 1, 1)]
    capsys.readouterr()
    assert audit_main(dsn, ["--json", "--verify"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert (run["dead"], run["unregistered"], run["kept"]) == (2, 1, 1)


def _insert_raw(conn: psycopg.Connection[Any], events: list[ev.Event]) -> None:
    """Events written as an older relay wrote them: plain INSERTs continuing the chain."""
    previous = codec.GENESIS_HASH
    for position, event in enumerate(events, 1):
        body = codec.canonical_bytes(position, event.type, event.data)
        previous = codec.chain_hash(previous, body)
        conn.execute("INSERT INTO events (position, type, token, run, body, hash)"
                     " VALUES (%s, %s, %s, %s, %s, %s)",
                     (position, event.type, event.data.get("token"), event.data.get("run"),
                      body, previous))


def test_migration_003_brings_old_runs_rows_to_the_fold(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for name, text in migrations():
            if name < "003":
                conn.execute(text.encode())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
        _insert_raw(conn, old_run())
        # The old cache row: "unregistered" held the dead-token verdicts.
        conn.execute("INSERT INTO runs (run, started_at_ms, finished_at_ms, tokens, delivered,"
                     " failed, abandoned, unregistered) VALUES (1, %s, %s, 3, 1, 2, 0, 2)",
                     (T0 + 100_000, T0 + 100_006))
    assert "003_run_outcomes.sql" in apply_migrations(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute("SELECT started_at_ms, finished_at_ms, tokens, delivered, failed,"
                           " abandoned, dead, unregistered, kept FROM runs").fetchone()
    assert row == EXPECTED
