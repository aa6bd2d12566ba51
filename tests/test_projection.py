"""Projection rules (the pure fold), the cache tables the Journal keeps, and LogReader."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from events import projection
from events import types as ev
from events.journal import Journal
from events.projection import NEW_DEVICE, State
from events.store import LogReader, TokenState
from relay.cluster import POINTS, shard_bounds, token_point

T0 = 1_700_000_000_000
ALL_POINTS, FIRST = (0, POINTS), (0, "")  # the whole token space as one shard


def by_point(tokens: list[str]) -> list[str]:
    """The order the keyset pages read tokens in: by point, then token."""
    return sorted(tokens, key=lambda t: (token_point(t), t))
A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


def fold(events: list[ev.Event]) -> State:
    state = State()
    for event in events:
        state.apply(event.type, event.data)
    return state


def failed(run: int, token: str, at: int, attempt: int, *, verdict: str = "transient",
           next_at: int | None = None) -> ev.Event:
    return ev.notification_failed(run, token, at, attempt=attempt, apns_id=f"id-{attempt}",
                                  status=None if verdict == "transient" else 410,
                                  reason="Unregistered" if verdict == "dead_token" else "Timeout",
                                  verdict=verdict, apple_timestamp_ms=None, latency_ms=1.5,
                                  next_attempt_at_ms=next_at)


def delivered(run: int, token: str, at: int, attempt: int = 1) -> ev.Event:
    return ev.notification_delivered(run, token, at, attempt=attempt, apns_id=f"id-{attempt}",
                                     status=200, latency_ms=2.0)


# --- the rules ------------------------------------------------------------------------


def test_registration_lifecycle_keeps_registered_at_exact() -> None:
    state = fold([ev.device_registered(A, T0), ev.device_registered(A, T0 + 5)])
    assert state.devices[A][:4] == (True, T0 + 5, None, None)
    state.apply(ev.DEVICE_UNREGISTERED, ev.device_unregistered(A, T0 + 9, "Unregistered").data)
    assert state.devices[A][:4] == (False, T0 + 5, T0 + 9, "Unregistered")
    state.apply(ev.DEVICE_REGISTERED, ev.device_registered(A, T0 + 12).data)
    assert state.devices[A][:4] == (True, T0 + 12, None, None)


def test_unregister_skipped_and_halts_change_nothing() -> None:
    state = fold([ev.device_registered(A, T0)])
    before = (dict(state.devices), dict(state.runs))
    state.apply(ev.UNREGISTER_SKIPPED, ev.unregister_skipped(
        A, T0 + 1, "Unregistered", verdict_at_ms=T0, registered_at_ms=T0, why="test").data)
    state.apply(ev.RELAY_HALTED, ev.relay_halted(T0, halt_class="relay_bug", reason="BadTopic",
                                                 status=400, message="m").data)
    assert (state.devices, state.runs) == before


def test_delivery_state_and_run_counts() -> None:
    state = fold([
        ev.device_registered(A, T0), ev.device_registered(B, T0), ev.device_registered(C, T0),
        ev.run_started(1, T0 + 100, 3),
        failed(1, A, T0 + 101, 1, next_at=T0 + 900),
        delivered(1, B, T0 + 102),
        failed(1, C, T0 + 103, 1, verdict="dead_token"),
    ])
    assert state.devices[A][4:] == (1, 1, T0 + 900, "id-1", None)
    assert state.devices[B][4:] == (1, 1, None, "id-1", "delivered")
    assert state.devices[C][4:] == (1, 1, None, "id-1", "dead")
    assert state.runs[1] == (T0 + 100, None, 3, 1, 2, 0, 1, 0, 0)
    state.apply(ev.NOTIFICATION_ABANDONED, ev.notification_abandoned(
        1, A, T0 + 950, attempts=5, apns_id="id-5", last_reason="Timeout").data)
    assert state.devices[A][4:] == (1, 5, None, "id-5", "abandoned")
    finished = ev.run_finished(1, T0 + 999, tokens=3, delivered=1, failed=2, abandoned=1,
                               dead=1, unregistered=0, kept=0)
    state.apply(finished.type, finished.data)
    assert state.runs[1] == (T0 + 100, T0 + 999, 3, 1, 2, 1, 1, 0, 0)


def test_token_events_for_unknown_tokens_create_inactive_rows() -> None:
    state = fold([delivered(4, A, T0)])
    assert state.devices[A] == (False, None, None, None, 4, 1, None, "id-1", "delivered")
    assert NEW_DEVICE[0] is False


# --- the tables equal the fold, whatever the batching --------------------------------------


def random_log(rng: random.Random, length: int) -> list[ev.Event]:
    tokens = [f"{i:064x}" for i in range(12)]
    events: list[ev.Event] = []
    run = 0
    t = T0
    for _ in range(length):
        t += rng.randrange(0, 3000)
        token = rng.choice(tokens)
        kind = rng.randrange(9)
        if kind <= 1:
            events.append(ev.device_registered(token, t))
        elif kind == 2:
            events.append(ev.device_unregistered(token, t, rng.choice(["api", "Unregistered"])))
        elif kind == 3:
            run += 1
            events.append(ev.run_started(run, t, rng.randrange(20)))
        elif kind == 4 and run:
            events.append(ev.run_finished(run, t, tokens=5, delivered=rng.randrange(5),
                                          failed=1, abandoned=0, dead=2, unregistered=1,
                                          kept=1))
        elif kind == 5 and run:
            events.append(delivered(max(1, run - rng.randrange(2)), token, t,
                                    rng.randrange(1, 4)))
        elif kind == 6 and run:
            verdict = rng.choice(["transient", "dead_token"])
            events.append(failed(run, token, t, rng.randrange(1, 5), verdict=verdict,
                                 next_at=t + 5000 if verdict == "transient" else None))
        elif kind == 7 and run:
            events.append(ev.notification_abandoned(run, token, t, attempts=5, apns_id="x",
                                                    last_reason=None))
        else:
            events.append(ev.unregister_skipped(token, t, "Unregistered", verdict_at_ms=t,
                                                registered_at_ms=None, why="test"))
    return events


def read_tables(dsn: str) -> tuple[dict[str, tuple[Any, ...]], dict[int, tuple[Any, ...]]]:
    """(devices, runs) as the tables hold them, rows in the fold's column order."""
    with psycopg.connect(dsn) as conn:
        devices = {token: tuple(rest) for token, *rest in conn.execute(
            f"SELECT token, {', '.join(projection.DEVICE_COLUMNS)} FROM devices")}
        runs = {run: tuple(rest) for run, *rest in conn.execute(
            f"SELECT run, {', '.join(projection.RUN_COLUMNS)} FROM runs")}
    return devices, runs


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tables_kept_by_the_journal_equal_the_fold(dsn: str, seed: int) -> None:
    rng = random.Random(seed)
    events = random_log(rng, 400)
    journal = Journal(dsn, max_batch=rng.choice([1, 7, 50]), max_delay=0.001)
    journal.start()
    try:
        futures, i = [], 0
        while i < len(events):
            n = rng.randrange(1, 12)
            futures.append(journal.append(events[i:i + n]))
            i += n
        for future in futures:
            future.result(20)
    finally:
        journal.stop(5)
    (devices, runs), expected = read_tables(dsn), fold(events)
    assert devices == expected.devices
    assert runs == expected.runs


# --- LogReader ------------------------------------------------------------------------


@pytest.fixture
def reader(dsn: str) -> Iterator[LogReader]:
    r = LogReader(dsn)
    yield r
    r.close()


def append(dsn: str, events: list[ev.Event]) -> None:
    journal = Journal(dsn, max_delay=0.001)
    journal.start()
    try:
        journal.append(events).result(10)
    finally:
        journal.stop(5)


def test_reader_on_an_empty_log(reader: LogReader) -> None:
    assert reader.registration(A) == (False, None)
    assert reader.active_count() == 0
    assert reader.due_tokens(1, ALL_POINTS, FIRST, 10) == []


def test_reader_registration_and_runs(dsn: str, reader: LogReader) -> None:
    append(dsn, [ev.device_registered(A, T0), ev.device_registered(A, T0 + 7),
                 ev.device_registered(B, T0), ev.device_unregistered(B, T0 + 1, "api"),
                 ev.run_started(1, T0 + 10, 1),
                 ev.run_finished(1, T0 + 20, tokens=1, delivered=1, failed=0, abandoned=0,
                                 dead=0, unregistered=0, kept=0),
                 ev.run_started(2, T0 + 30, 1), delivered(2, A, T0 + 31)])
    assert reader.registration(A) == (True, T0 + 7)
    assert reader.registration(B) == (False, T0)
    assert reader.active_count() == 1


def test_due_tokens_pages_active_tokens_without_a_final_outcome(
        dsn: str, reader: LogReader) -> None:
    tokens = [f"{i:064x}" for i in range(10)]
    append(dsn, [ev.device_registered(t, T0) for t in tokens] + [
        ev.device_unregistered(tokens[9], T0 + 1, "api"),
        ev.run_started(1, T0 + 2, 9),
        delivered(1, tokens[0], T0 + 3),                          # final in run 1
        failed(1, tokens[1], T0 + 4, 2, next_at=T0 + 60_000),      # in back-off
        failed(1, tokens[2], T0 + 5, 1, verdict="dead_token"),     # final: dead
        delivered(1, tokens[3], T0 + 6),
    ])
    pages, after = [], FIRST
    while page := reader.due_tokens(1, ALL_POINTS, after, 2):
        pages.append(page)
        after = (token_point(page[-1].token), page[-1].token)
    due = {state.token: state for page in pages for state in page}
    assert all(len(page) <= 2 for page in pages)
    assert list(due) == by_point([tokens[1], *tokens[4:9]])
    assert due[tokens[1]] == TokenState(tokens[1], 2, T0 + 60_000, "id-2")
    assert due[tokens[4]] == TokenState(tokens[4], 0, None, None)
    # Within one shard: only its points.
    low, high = shard_bounds(1, 2)
    assert [s.token for s in reader.due_tokens(1, (low, high), (low, ""), 100)] == [
        t for t in due if low <= token_point(t) < high]
    # In the next run, last run's finals no longer count; their state reads as fresh.
    nxt = {s.token: s for s in reader.due_tokens(2, ALL_POINTS, FIRST, 100)}
    assert list(nxt) == by_point(tokens[:9])
    assert nxt[tokens[0]] == TokenState(tokens[0], 0, None, None)


def test_the_reader_never_reads_the_log(dsn: str) -> None:
    """Start-up and paging answer from the cache tables: a role that may not read the
    events table gets every answer (the log can be millions of events)."""
    role = f"relay_reader_{uuid.uuid4().hex[:8]}"
    append(dsn, [ev.device_registered(A, T0), ev.run_started(1, T0 + 1, 1)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON devices, runs, log_head TO {role}")
    role_dsn = conninfo.make_conninfo(dsn, user=role)
    with psycopg.connect(role_dsn) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT count(*) FROM events")
    reader = LogReader(role_dsn)
    try:
        assert reader.registration(A) == (True, T0)
        assert reader.active_count() == 1
        assert [s.token for s in reader.due_tokens(1, ALL_POINTS, FIRST, 10)] == [A]
    finally:
        reader.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("seed", range(20))
def test_slices_folded_apart_and_merged_equal_the_whole_fold(seed: int) -> None:
    """What the parallel audit relies on: patches of consecutive slices, merged in order."""
    rng = random.Random(seed)
    events = random_log(rng, 300)
    cuts = sorted(rng.sample(range(1, len(events)), rng.randrange(1, 8)))
    merged = State()
    for lo, hi in zip([0, *cuts], [*cuts, len(events)], strict=True):
        patch = State(patch=True)
        for event in events[lo:hi]:
            patch.apply(event.type, event.data)
        merged.merge(patch)
    whole = fold(events)
    assert merged.devices == whole.devices
    assert merged.runs == whole.runs
