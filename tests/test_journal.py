"""The Journal on real PostgreSQL: group commit, concurrent writers, outages."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from events import batch_sql, codec
from events import journal as journal_module
from events import types as ev
from events.batch_sql import append_bulk
from events.journal import Journal, JournalError, JournalStopped
from relay import database

TOKEN = "ab" * 32


def registered(i: int) -> ev.Event:
    return ev.device_registered(f"{i:064x}", 1_700_000_000_000 + i)


def count_events(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def journal(dsn: str) -> Iterator[Journal]:
    j = Journal(dsn, max_batch=100, max_delay=0.002)
    j.start()
    yield j
    j.stop(5)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry policy's shape, at test speed."""
    monkeypatch.setattr(database, "RETRY_MIN", 0.01)
    monkeypatch.setattr(database, "RETRY_MAX", 0.05)


def test_append_resolves_with_positions_after_commit(dsn: str, journal: Journal) -> None:
    first = journal.append([registered(1), registered(2)]).result(10)
    second = journal.append([registered(3)]).result(10)
    assert first == [1, 2]
    assert second == [3]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT position, type, token, body, hash FROM events"
                            " ORDER BY position").fetchall()
        head = conn.execute("SELECT position, hash FROM log_head").fetchone()
    previous = codec.GENESIS_HASH
    for position, type_, token, body, hash_ in rows:
        event = registered(position)
        assert bytes(body) == codec.canonical_bytes(position, event.type, event.data)
        assert (type_, token) == (event.type, event.data["token"])
        previous = codec.chain_hash(previous, bytes(body))
        assert bytes(hash_) == previous
    assert head == (3, previous)


def test_acknowledges_only_what_is_committed(dsn: str, journal: Journal) -> None:
    """A future's callback runs after COMMIT: another connection already sees the rows."""
    seen: list[int] = []
    done = threading.Event()

    def check(future: Future[list[int]]) -> None:
        seen.append(count_events(dsn))
        done.set()

    journal.append([registered(i) for i in range(5)]).add_done_callback(check)
    assert done.wait(10)
    assert seen == [5]


def test_group_commit_batches_many_appenders(dsn: str, journal: Journal) -> None:
    futures = [journal.append([registered(i)]) for i in range(300)]
    positions = sorted(p for f in futures for p in f.result(10))
    assert positions == list(range(1, 301))
    with psycopg.connect(dsn) as conn:
        batches = conn.execute("SELECT count(*) FROM journal_batches").fetchone()
    assert batches is not None and batches[0] < 300, "each append got its own transaction"


def test_one_append_stays_together_and_in_order(journal: Journal) -> None:
    big = [registered(i) for i in range(250)]  # larger than max_batch
    positions = journal.append(big).result(10)
    assert positions == list(range(1, 251))


def test_append_bulk_writes_what_the_journal_writes(dsn: str, journal: Journal) -> None:
    """Seeding in bulk continues the same chain, in the same bytes, with the same caches."""
    bulk = [registered(i) for i in range(5)] + [ev.run_started(1, 1_700_000_001_000, 5)]
    assert journal.append([registered(100)]).result(10) == [1]
    assert append_bulk(dsn, bulk, chunk=4) == len(bulk)
    assert journal.append([registered(101)]).result(10) == [8]
    events = [registered(100), *bulk, registered(101)]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT position, body, hash FROM events ORDER BY position").fetchall()
        devices = conn.execute("SELECT count(*) FROM devices WHERE active").fetchone()
        runs = conn.execute("SELECT run, tokens FROM runs").fetchall()
    previous = codec.GENESIS_HASH
    for (position, body, hash_), event in zip(rows, events, strict=True):
        assert bytes(body) == codec.canonical_bytes(position, event.type, event.data)
        previous = codec.chain_hash(previous, bytes(body))
        assert bytes(hash_) == previous
    assert devices == (7,) and runs == [(1, 5)]


def test_malformed_events_fail_their_future_only(journal: Journal) -> None:
    bad = journal.append([ev.Event("no_such_type", {"token": TOKEN})])
    reserved = journal.append([ev.Event(ev.DEVICE_REGISTERED, {"token": TOKEN, "position": 3})])
    unencodable = journal.append([ev.Event(ev.DEVICE_REGISTERED, {"token": TOKEN, "x": object()})])
    good = journal.append([registered(1)])
    for future in (bad, reserved, unencodable):
        with pytest.raises(codec.EventEncodingError):
            future.result(10)
    assert good.result(10) == [1]


def test_a_crashed_writer_fails_its_batch_and_a_restart_writes_the_queue(
        dsn: str, journal: Journal, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the writer: its batch gets an error (never a success), appends made while
    it is down wait, and the restarted writer commits them in order after the rest."""
    assert journal.append([registered(1)]).result(10) == [1]
    original = Journal._write

    def crashing(self: Journal, *args: Any) -> int:
        monkeypatch.setattr(Journal, "_write", original)
        raise RuntimeError("injected writer bug")

    monkeypatch.setattr(Journal, "_write", crashing)
    with pytest.raises(JournalError, match="injected writer bug"):
        journal.append([registered(2)]).result(10)
    deadline = time.monotonic() + 10
    while journal.alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting = journal.append([registered(3), registered(4)])
    time.sleep(0.1)
    assert not waiting.done()
    journal.restart()
    assert waiting.result(10) == [2, 3]
    assert journal.alive() and count_events(dsn) == 3
    assert "the Journal's writer crashed on a batch of 1 events" in caplog.text


def test_stop_flushes_then_refuses(dsn: str) -> None:
    j = Journal(dsn, max_delay=1.0)
    j.start()
    pending = j.append([registered(1)])
    j.stop(5)
    assert pending.result(0) == [1]
    with pytest.raises(JournalStopped):
        j.append([registered(2)]).result(0)


def test_concurrent_journals_never_leave_a_gap_for_a_paging_reader(dsn: str) -> None:
    """Several writers on one database; a reader paging by position sees every event
    exactly once, in order, while they write."""
    writers, appends, per_append = 4, 60, 5
    total = writers * appends * per_append
    journals = [Journal(dsn, max_batch=50, max_delay=0.001) for _ in range(writers)]
    for j in journals:
        j.start()
    futures: list[Future[list[int]]] = []
    lock = threading.Lock()

    def write(j: Journal, w: int) -> None:
        for a in range(appends):
            future = j.append([registered(w * 100_000 + a * 10 + k) for k in range(per_append)])
            with lock:
                futures.append(future)

    seen: list[int] = []

    def read() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while len(seen) < total:
                after = seen[-1] if seen else 0
                rows = conn.execute("SELECT position FROM events WHERE position > %s"
                                    " ORDER BY position LIMIT 37", (after,)).fetchall()
                seen.extend(row[0] for row in rows)

    threads = [threading.Thread(target=write, args=(j, w)) for w, j in enumerate(journals)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acknowledged = sorted(p for f in futures for p in f.result(30))
    reader.join(30)
    for j in journals:
        j.stop(5)
    assert acknowledged == list(range(1, total + 1))
    assert seen == list(range(1, total + 1))


# --- outages: a TCP proxy between the Journal and PostgreSQL ------------------------------


class Proxy:
    """Forwards TCP to the database; can cut every connection, or cut right after the
    client sent COMMIT (before the server's answer reaches it)."""

    def __init__(self, dsn: str) -> None:
        params = conninfo.conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        port = int(params.get("port") or 5432)
        self._target: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/")
            else (socket.AF_INET, (host, port)))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.dsn = conninfo.make_conninfo(
            dbname=str(params["dbname"]), user=str(params.get("user") or "postgres"),
            host="127.0.0.1", port=str(self.port), sslmode="disable",
            **({"password": str(params["password"])} if params.get("password") else {}))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.down = False
        # Set to bytes that end a transaction (b"COMMIT", or SYNC for a statement sent
        # outside one): the next upstream chunk holding them reaches the server, then the
        # connection is cut before any answer.
        self.cut_after: bytes | None = None
        self.commits_cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            server = socket.socket(self._target[0], socket.SOCK_STREAM)
            server.connect(self._target[1])
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
                if upstream and self.cut_after is not None and self.cut_after in data:
                    self.cut_after = None
                    self.commits_cut += 1
                    # Let the server read the COMMIT; the client never hears back.
                    source.shutdown(socket.SHUT_RDWR)
                    return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.down = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    p = Proxy(dsn)
    yield p
    p.close()


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_outage_futures_resolve_after_the_database_returns(
        dsn: str, proxy: Proxy, fast_retries: None) -> None:
    j = Journal(proxy.dsn, max_delay=0.001)
    j.start()
    try:
        assert j.append([registered(0)]).result(10) == [1]
        proxy.cut()
        during = [j.append([registered(i)]) for i in range(1, 6)]
        wait_for(lambda: not j.database_available)
        assert not any(f.done() for f in during)
        proxy.restore()
        positions = [f.result(10) for f in during]
        assert positions == [[2], [3], [4], [5], [6]]
        assert j.database_available
    finally:
        j.stop(5)
    assert count_events(dsn) == 6


# The extended protocol's Sync message: a statement sent outside a transaction commits there.
SYNC = b"S\x00\x00\x00\x04"


@pytest.mark.parametrize(("size", "commits_with"), [
    (10, SYNC),  # a small batch after one of ours: one statement, its own transaction
    (batch_sql.INSERT_MAX_EVENTS + 10, b"COMMIT"),  # COPY under the lock, then COMMIT
], ids=["one statement", "locked COPY"])
def test_connection_lost_during_commit_neither_duplicates_nor_loses(
        dsn: str, proxy: Proxy, fast_retries: None, size: int, commits_with: bytes) -> None:
    j = Journal(proxy.dsn, max_delay=0.001)
    j.start()
    try:
        assert j.append([registered(0)]).result(10) == [1]
        proxy.cut_after = commits_with
        batch = [registered(i) for i in range(1, size + 1)]
        assert j.append(batch).result(20) == list(range(2, size + 2))
        assert proxy.commits_cut == 1
        assert j.append([registered(size + 1)]).result(10) == [size + 2]
    finally:
        j.stop(5)
    with psycopg.connect(dsn) as conn:
        tokens = [row[0] for row in conn.execute("SELECT token FROM events ORDER BY position")]
    assert tokens == [f"{i:064x}" for i in range(size + 2)]


def test_an_idle_journal_notices_a_lost_database_and_its_return(
        dsn: str, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is written, yet database_available (and so /health) follows the database."""
    monkeypatch.setattr(journal_module, "PROBE_EVERY", 0.1)
    j = Journal(proxy.dsn)
    j.start()
    try:
        assert j.append([registered(0)]).result(10) == [1]
        proxy.cut()
        wait_for(lambda: not j.database_available, timeout=5)
        proxy.restore()
        wait_for(lambda: j.database_available, timeout=5)
        assert j.append([registered(1)]).result(10) == [2]
    finally:
        j.stop(5)


def test_a_lone_append_does_not_wait_for_company(dsn: str) -> None:
    """An idle writer commits at once: with max_delay 0 (the default) a batch never waits
    to fill, so sequential appends are one commit each."""
    j = Journal(dsn)
    j.start()
    try:
        for i in range(5):
            assert j.append([registered(i)]).result(10) == [i + 1]
    finally:
        j.stop(5)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM journal_batches").fetchone()
    assert row is not None and row[0] == 5


def test_a_decision_on_an_idle_writer_is_written_at_once(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead-token decision wakes an idle writer like any append: it is not left for the
    writer's next idle probe (an hour here), which would keep the verdict's answer and
    the token's unregistration waiting."""
    monkeypatch.setattr(journal_module, "PROBE_EVERY", 3600.0)
    j = Journal(dsn)
    j.start()
    try:
        assert j.append([registered(1)]).result(10) == [1]
        token = registered(1).data["token"]
        seen: list[tuple[bool, int | None]] = []

        def decide(active: bool, registered_at_ms: int | None) -> ev.Event:
            seen.append((active, registered_at_ms))
            return ev.device_unregistered(token, 1_700_000_000_500, "Unregistered")

        written = j.append_decided(token, decide).result(10)
        assert written is not None and written.type == ev.DEVICE_UNREGISTERED
        assert seen == [(True, 1_700_000_000_001)]
    finally:
        j.stop(5)
    assert count_events(dsn) == 2


def _one_registration(conn: psycopg.Connection[Any], token: str) -> tuple[str, list[Any]]:
    """A guessed-head statement for one registration after the log's current head."""
    row = conn.execute("SELECT position, hash FROM log_head").fetchone()
    assert row is not None
    conn.rollback()
    position, _, patch, rows = batch_sql.event_columns(
        [batch_sql.encode(ev.device_registered(token, 1_700_000_000_000))], row[0], row[1])
    return batch_sql.one_statement(rows, patch, [uuid.uuid4(), position, position],
                                   take_lock=True)


def test_a_prepared_statement_is_its_own_transaction(dsn: str) -> None:
    """Sent on a connection that is not in autocommit, the statement still commits by
    itself (another connection sees it) and leaves no transaction open; one left open
    before it is rolled back, not joined."""
    with psycopg.connect(dsn) as conn:
        prepared = batch_sql.Prepared(conn)
        assert prepared.run(_one_registration(conn, TOKEN)) == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("SELECT 1")  # psycopg opens a transaction
        statement = _one_registration(conn, "cd" * 32)
        conn.execute("SELECT 1")
        assert prepared.run(statement) == 1
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with psycopg.connect(dsn) as other:
        tokens = [row[0] for row in other.execute("SELECT token FROM events ORDER BY position")]
    assert tokens == [TOKEN, "cd" * 32]


def test_a_refused_prepared_statement_raises_the_error_of_its_sqlstate(dsn: str) -> None:
    """A statement whose positions another commit took is refused with psycopg's class for
    the SQLSTATE (what the Journal tells apart), and nothing of it stays."""
    with psycopg.connect(dsn) as conn:
        prepared = batch_sql.Prepared(conn)
        stale = _one_registration(conn, TOKEN)
        assert prepared.run(_one_registration(conn, "cd" * 32)) == 1
        with pytest.raises(psycopg.errors.UniqueViolation):
            prepared.run(stale)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert prepared.run(_one_registration(conn, "ef" * 32)) == 1  # still usable
    assert count_events(dsn) == 2


def test_a_prepared_statement_survives_psycopg_deallocating_all_of_them(dsn: str) -> None:
    """psycopg answers a ROLLBACK on a connection where it prepared statements with
    DEALLOCATE ALL (the Journal's locked path rolls back, e.g. after a refused fence):
    ours are prepared again, and the batch is written once."""
    with psycopg.connect(dsn) as conn:
        conn.prepare_threshold = 0  # psycopg prepares its own statements at once
        prepared = batch_sql.Prepared(conn)
        assert prepared.run(_one_registration(conn, TOKEN)) == 1
        conn.execute("SELECT 1")
        conn.rollback()
        conn.execute("SELECT 2")  # preceded by psycopg's DEALLOCATE ALL
        conn.rollback()
        assert prepared.run(_one_registration(conn, "cd" * 32)) == 1
    assert count_events(dsn) == 2


def test_a_prepared_statement_names_a_parameter_it_cannot_send() -> None:
    with pytest.raises(TypeError, match="float"):
        batch_sql.Prepared(None).run(("SELECT %s", [1.5]))  # type: ignore[arg-type]


def test_a_small_batch_after_another_writer_moved_the_head_is_written_after_it(
        dsn: str) -> None:
    """The one-round-trip write assumes the head our last commit left; another writer's
    commit in between makes the trigger refuse it, and the batch goes in after that."""
    j = Journal(dsn)
    j.start()
    try:
        assert j.append([registered(0)]).result(10) == [1]
        assert append_bulk(dsn, [registered(i) for i in range(1, 4)]) == 3
        assert j.append([registered(4)]).result(10) == [5]
        assert j.append([registered(5)]).result(10) == [6]
    finally:
        j.stop(5)
    with psycopg.connect(dsn) as conn:
        tokens = [row[0] for row in conn.execute("SELECT token FROM events ORDER BY position")]
    assert tokens == [f"{i:064x}" for i in range(6)]


def test_writers_taking_turns_stop_guessing_the_head_after_one_refusal(
        dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Two relays' Journals appending in turn: the head moves between every two commits of
    each, so after one refused guess each takes the lock first, and psycopg warns about
    an aborted pipeline once per writer, not once per batch."""
    monkeypatch.setattr(journal_module, "SHARED_HEAD_REST", 60.0)
    writers = [Journal(dsn), Journal(dsn)]
    for j in writers:
        j.start()
    try:
        with caplog.at_level("WARNING", logger="psycopg"):
            for i in range(20):
                assert writers[i % 2].append([registered(i)]).result(10) == [i + 1]
    finally:
        for j in writers:
            j.stop(5)
    aborted = [r for r in caplog.records if "pipeline aborted" in r.getMessage()]
    assert len(aborted) <= len(writers)
    with psycopg.connect(dsn) as conn:
        tokens = [row[0] for row in conn.execute("SELECT token FROM events ORDER BY position")]
    assert tokens == [f"{i:064x}" for i in range(20)]


@pytest.mark.parametrize("where", ["small batch", "COPY batch"])
def test_a_writer_paused_holding_the_head_lock_stalls_the_others_only_for_its_hold_limit(
        dsn: str, fast_retries: None, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """One relay process stopped (SIGSTOP, a VM stall) in the middle of an append holds
    the log's head lock: the server ends its transaction after its hold limit (idle
    between statements, or a COPY waiting for rows), so another process's append commits
    while it is still paused; resumed, its batch is written again, once."""
    paused, resume = threading.Event(), threading.Event()
    if where == "small batch":  # one statement, after the head lock
        stalled_events = [registered(1)]
        patched, target = batch_sql, "event_columns"
        calls_before_pause = 0
    else:  # a batch past INSERT_MAX_EVENTS goes by COPY, paused while hashing its rows
        stalled_events = [registered(i) for i in range(1, batch_sql.INSERT_MAX_EVENTS + 40)]
        patched, target = codec, "chain_hash"
        calls_before_pause = 30
    original, calls = getattr(patched, target), [0]

    def pausing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] > calls_before_pause and not paused.is_set():
            paused.set()
            resume.wait(60)
        return original(*args)

    monkeypatch.setattr(patched, target, pausing)
    stalled, other = Journal(dsn, hold_limit=0.5), Journal(dsn)
    stalled.start()
    other.start()
    try:
        held = stalled.append(stalled_events)
        assert paused.wait(10)
        # The server ends the paused transaction (at 0.5 s), and the other commits first.
        assert other.append([registered(0)]).result(20) == [1]
        assert not held.done(), "still paused"
        resume.set()
        assert held.result(20) == list(range(2, len(stalled_events) + 2))
    finally:
        resume.set()
        stalled.stop(5)
        other.stop(5)
    with psycopg.connect(dsn) as conn:
        tokens = [row[0] for row in conn.execute("SELECT token FROM events ORDER BY position")]
    assert tokens == [f"{i:064x}" for i in range(len(stalled_events) + 1)]
