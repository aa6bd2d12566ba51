"""The Journal: the one writer of the event log, with group commit.

Every component appends through `Journal.append`, which never blocks: the events
are encoded in the caller's thread and queued. One writer thread takes whatever is
queued (up to `max_batch` events) and writes it in ONE transaction:

    lock the head row (FOR UPDATE)  -> positions head+1.. and the previous hash
    COPY the events (binary)        -> the insert trigger moves the head and checks
                                       the batch is contiguous and continues the chain
    COPY the batch's patch of the cache tables (events/projection.py), then in one
    pipelined round trip: MERGE it into devices, upsert the runs,
    record the batch id             -> journal_batches
    COMMIT                          -> then, and only then, resolve the futures

A small batch (up to INSERT_MAX_EVENTS events, the usual case) skips both COPYs: after
the head lock, its events, its cache upserts and its batch record are ONE statement
with binary column arrays, pipelined with COMMIT (the SQL of both ways: events/batch_sql.py).
After a commit of ours the head we left is assumed, and the next small batch is even
less: one statement outside any transaction, prepared once per connection and sent by
libpq directly (`batch_sql.Prepared`), whose first WITH parts take the head lock and
check its fences (`_write_guessed`), i.e. one round trip, one result and no transaction
left open between messages.

One commit per batch instead of per event is what makes the log fast (the fsync is
shared); appenders that arrive while a transaction runs form the next batch. The
writer never waits for a batch to fill: an idle writer commits a lone request at
once, and batches form only under load, from what queued during the previous commit.

An idle writer checks the database every `PROBE_EVERY` seconds (one `SELECT 1`), so
`database_available` (and /health) turns false soon after the database goes away even
when nothing is written, and true again once it answers.

Decisions under the lock (`append_decided`): an event that depends on a token's
registration (APNs called the token dead: unregister it, or keep it because the
device registered again) is decided inside the append transaction, after the head
lock, from the devices table overlaid with the batch's earlier events. Every writer
of the log takes that lock, so no registration can commit between the read and the
event: the decision and the event are one atomic step, whichever process registered.

Fencing (several relays, relay/cluster.py): an outcome event carries its token's shard
and the epoch of the lease it was sent under. Under the head lock the append checks
each request's epochs against `cluster_shards` (whose epochs move only under that same
lock): a request whose shard has moved on is refused, alone, with `Fenced`, and the rest
of the batch is written. The one-round-trip path asks the database to refuse the whole
transaction instead (`cluster_fence`) and then takes the locked path.

Database failures: the writer marks the database unavailable, retries the same
batch with the pauses of `relay.database.RetryPauses` (400 ms to 30 s) until it
commits, and only then takes the next batch, so order is kept. A connection lost
during COMMIT leaves us not knowing whether the batch committed. Each batch carries
a random id written in its own transaction; a retry first locks the head and then
looks the id up. Holding the head lock means the earlier attempt has finished one
way or the other (it held that lock until its end), so the lookup is definitive:
found, the batch is in the log at the recorded positions and is not written again;
absent, it never committed and is written now. No event is duplicated or lost.

If the Journal must stop (its stop deadline passed) while a batch's COMMIT is in
doubt, nobody can tell yet whether the batch is in the log. Its appenders hear
exactly that ("fate unknown"), and the batch id is written to the `unsettled` file;
the next start looks each id up and says what became of it (the log itself needs
nothing: a committed batch is in it, an uncommitted one is not, and a resumed run
sends again whatever has no outcome).

One module of about 600 lines for one idea, the writer thread: its batching, the
transaction under the head lock with the decisions and fences taken there, the retry
and the COMMIT in doubt lean on one another's invariants (the head lock, the batch id,
the order of batches). How a batch becomes SQL is events/batch_sql.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from events import arrays, batch_sql, codec, projection
from events import types as ev
from events.types import Event
from relay import metrics
from relay.config import ClusterConfig
from relay.database import (
    RetryPauses,
    connect,
    first_line,
    idle_transaction_limit,
    is_transient,
)

log = logging.getLogger(__name__)

# Detect a dead TCP peer within about 25 s instead of the kernel's 2 h.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}
# journal_batches only matters for a retry in flight; prune rows older than this,
# once every PRUNE_EVERY batches.
BATCH_RETENTION = "7 days"
PRUNE_EVERY = 1000

# Most events per group-commit transaction. A batch only grows this large when appenders
# outpace the writer, and then each transaction's fixed
# cost (head lock, MERGE round trip, fsync) is what limits: bench/journal.py gave ~45k
# events/s at 1,000 and ~58k at 4,000 on a 2-core machine.
MAX_BATCH = 4000
# How long the writer may stay idle before it checks that the database still answers
# (/health must turn 503 within 5 s of losing it when nothing is written).
PROBE_EVERY = 1.0
# SQLSTATE of cluster_fence's refusal (schema/006_cluster.sql).
FENCE_SQLSTATE = "RL001"
# After another writer moved the head under a one-round-trip write, the next small batches
# take the head lock first for this long (seconds): with several relays on one log the head
# mostly moves between our commits, so guessing it would cost a refused round trip (and
# psycopg's warning about the aborted pipeline) per batch.
SHARED_HEAD_REST = 1.0


class JournalStopped(RuntimeError):
    """The Journal stopped before these events were known to be committed; the message
    says whether they are not in the log or their fate is settled at the next start."""


class Fenced(RuntimeError):
    """The events were refused: their shard's lease moved to a newer epoch (another
    process took the shard over); nothing of them is in the log."""


class JournalError(RuntimeError):
    """The database refused the batch for a reason retrying cannot cure (a bug, or tampering)."""


# A registration-dependent decision: (active, registered_at_ms) -> the event, or None.
Decide = Callable[[bool, "int | None"], "Event | None"]


@dataclass
class _Request:
    events: list[batch_sql.Encoded]
    future: Future[Any]  # positions; for a decision, the event decided (or None)
    enqueued: float
    decide: tuple[str, Decide] | None = None  # (token, rule), decided under the head lock
    decided: Event | None = None
    fences: frozenset[ev.Fence] = frozenset()  # (shard, epoch) its outcomes were sent under
    refused: int = 0  # events fenced out: a shard's epoch had moved on


def _fences(events: Sequence[batch_sql.Encoded]) -> frozenset[ev.Fence]:
    return frozenset(fence for event in events if (fence := ev.fence_of(event.data)))


def _fence_arrays(batch: list[_Request]) -> tuple[list[int], list[int]] | None:
    pairs = sorted({fence for request in batch for fence in request.fences})
    return ([shard for shard, _ in pairs], [epoch for _, epoch in pairs]) if pairs else None


def _refuse_stale(cur: psycopg.Cursor[Any], batch: list[_Request]) -> None:
    """Under the head lock: requests sent under an epoch that is no longer their shard's
    are refused (their events dropped from the batch)."""
    shards = sorted({shard for request in batch for shard, _ in request.fences})
    if not shards:
        return
    current = dict(cur.execute("SELECT shard, epoch FROM cluster_shards WHERE shard = ANY(%s)",
                               (shards,)).fetchall())
    for request in batch:
        if request.events and any(current.get(shard) != epoch
                                  for shard, epoch in request.fences):
            request.refused, request.events = len(request.events), []


def _decide(cur: psycopg.Cursor[Any], batch: list[_Request]) -> None:
    """Decide the batch's conditional events (under the head lock): each sees the
    devices table as committed, overlaid with the events before it in the batch."""
    tokens = [request.decide[0] for request in batch if request.decide is not None]
    state: dict[str, tuple[bool, int | None]] = {
        token: (bool(active), registered) for token, active, registered in cur.execute(
            "SELECT token, active, registered_at_ms FROM devices WHERE token = ANY(%s)",
            (tokens,))}
    for request in batch:
        if request.decide is not None:
            token, decide = request.decide
            request.decided = decided = decide(*state.get(token, (False, None)))
            request.events = [] if decided is None else [batch_sql.encode(decided)]
        for event in request.events:
            token = event.data.get("token")
            if token is None:
                continue
            if event.type == ev.DEVICE_REGISTERED:
                state[token] = (True, projection.time_ms(event.data["at"]))
            elif event.type == ev.DEVICE_UNREGISTERED:
                state[token] = (False, state.get(token, (False, None))[1])


class Journal:
    """The one writer of the event log (see the module docstring for the protocol)."""

    def __init__(self, dsn: str, *, max_batch: int = MAX_BATCH, max_delay: float = 0.0,
                 unsettled: Path | None = None,
                 hold_limit: float = ClusterConfig().hold_limit) -> None:
        """`max_delay`: extra seconds to wait for a batch to fill after its first request;
        0 (no wait) serves every load best, larger values only help tests hold a batch.
        `hold_limit`: the server ends a transaction of ours idle this long while it holds
        the head lock (this process paused): every writer on the database waits on it."""
        self._dsn = dsn
        self._hold_limit = hold_limit
        self._unsettled = unsettled  # where batch ids whose COMMIT is in doubt are kept
        self._commit_sent = False  # the current attempt's COMMIT may have reached the server
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = float("inf")
        self._available = True
        self._conn: psycopg.Connection[Any] | None = None
        self._prepared: batch_sql.Prepared | None = None  # the guessed path's, per connection
        self._head: tuple[int, bytes] | None = None  # (position, hash) our last commit left
        self._guess_head_after = 0.0  # monotonic time; see SHARED_HEAD_REST
        self._batches = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the Journal is already started")
        self._settle()
        self._start_writer()

    def _settle(self) -> None:
        """Say what became of batches a previous stop left with their fate unknown."""
        path = self._unsettled
        if path is None or not path.exists():
            return
        try:
            with connect(self._dsn, application_name="relay-journal") as conn:
                for line in path.read_text().split():
                    batch_id, _, count = line.partition(":")
                    found = conn.execute("SELECT first_position, last_position FROM "
                                         "journal_batches WHERE batch = %s",
                                         (batch_id,)).fetchone()
                    if found is None:
                        log.warning("batch %s (%s events), whose fate was unknown at the last "
                                    "stop, did not commit: its events are not in the log",
                                    batch_id, count)
                    else:
                        log.warning("batch %s (%s events), whose fate was unknown at the last "
                                    "stop, had committed: positions %d to %d", batch_id, count,
                                    found[0], found[1])
        except psycopg.Error as exc:
            log.warning("cannot settle the batches left unknown at the last stop yet (%s); "
                        "they stay in %s for the next start", exc, path)
            return
        path.unlink()

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """False once the writer crashed (a bug): appends queue until `restart`."""
        return self._thread is not None and self._thread.is_alive()

    def restart(self) -> None:
        """A new writer after a crash; what was queued meanwhile is written in order."""
        with self._cond:
            if self._stopping or self.alive():
                return
        log.warning("restarting the Journal's writer")
        self._start_writer()

    def append(self, events: Sequence[Event]) -> Future[list[int]]:
        """Queue events; the future resolves with their positions after COMMIT.

        The events of one call are committed together, in order, in one transaction.
        A malformed event fails the future with `codec.EventEncodingError` at once.
        Future callbacks run on the writer thread: keep them short (e.g. tell an actor).
        """
        future: Future[list[int]] = Future()
        try:
            encoded = [batch_sql.encode(event) for event in events]
        except codec.EventEncodingError as exc:
            future.set_exception(exc)
            return future
        if not encoded:
            future.set_result([])
            return future
        if not self._enqueue(_Request(encoded, future, time.monotonic(),
                                      fences=_fences(encoded))):
            future.set_exception(JournalStopped("the Journal is not running"))
        return future

    def append_decided(self, token: str, decide: Decide) -> Future[Event | None]:
        """Queue an event about `token` that `decide` chooses from the token's
        registration (active, registered_at_ms) as it is at the moment of the append,
        after every event committed or queued before it; resolves with the event
        written (None: nothing written) after COMMIT. While the registration cannot be
        read nothing is written: the batch is retried as any other."""
        future: Future[Event | None] = Future()
        if not self._enqueue(_Request([], future, time.monotonic(), (token, decide))):
            future.set_exception(JournalStopped("the Journal is not running"))
        return future

    def barrier(self) -> Future[list[int]]:
        """Resolves once every append queued before it has been committed (or failed):
        whoever reads the log after it sees all of them that made it."""
        future: Future[list[int]] = Future()
        if not self._enqueue(_Request([], future, time.monotonic())):
            future.set_result([])
        return future

    def _enqueue(self, request: _Request) -> bool:
        """Queue `request` and wake the writer, which may be idle until its next probe;
        False, with nothing queued, when the Journal is not running."""
        with self._cond:
            if self._stopping or self._thread is None:
                return False
            self._queue.append(request)
            self._cond.notify()
        return True

    @property
    def database_available(self) -> bool:
        """False while the last attempt to write failed."""
        return self._available

    def stop(self, timeout: float) -> None:
        """Flush what is queued (retrying for at most `timeout` s), then stop the writer."""
        with self._cond:
            self._stopping = True
            self._stop_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
            if self._thread.is_alive():
                log.error("the Journal's writer did not stop within %.1f s", timeout)
        with self._cond:
            abandoned, self._queue = list(self._queue), deque()
        self._fail(abandoned, JournalStopped("the Journal stopped before these events "
                                             "were committed"))

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        batch: list[_Request] | None = []
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    self._probe()
                elif not batch:
                    return
                else:
                    self._commit(batch)
        except Exception as exc:
            # A bug, not the database (its errors are handled in _commit): that batch may
            # be the cause, so it is failed, not retried; its callers see an error, never
            # a success. Whatever is queued waits for the supervisor's `restart`.
            batch = batch or []
            log.critical("the Journal's writer crashed on a batch of %d events",
                         sum(len(r.events) for r in batch), exc_info=True)
            self._fail([r for r in batch if not r.future.done()],
                       JournalError(f"the Journal's writer crashed: {exc!r}"))
        finally:
            self._discard_connection()

    def _take_batch(self) -> list[_Request] | None:
        """Wait for a request, then take what is queued (up to max_batch events); [] when
        stopping with nothing queued, None after PROBE_EVERY idle seconds."""
        batch: list[_Request] = []
        count = 0
        with self._cond:
            if not self._queue and not self._stopping:
                self._cond.wait(PROBE_EVERY)
                if not self._queue and not self._stopping:
                    return None
            if not self._queue:
                return batch
            deadline = self._queue[0].enqueued + self._max_delay
            while True:
                while self._queue and count < self._max_batch:
                    request = self._queue.popleft()
                    if request.future.set_running_or_notify_cancel():  # else: cancelled
                        batch.append(request)
                        count += len(request.events)
                remaining = deadline - time.monotonic()
                if count >= self._max_batch or self._stopping or remaining <= 0:
                    return batch
                self._cond.wait(remaining)

    def _commit(self, batch: list[_Request]) -> None:
        if not any(request.events or request.decide for request in batch):  # barriers only
            self._resolve(batch, 0)
            return
        batch_id = uuid.uuid4()
        pauses = RetryPauses()
        retrying = in_doubt = False
        while True:
            try:
                positions = self._write(batch, batch_id, retrying)
            except psycopg.Error as exc:
                self._discard_connection()
                if not is_transient(exc):
                    log.error("the database refused a batch of %d events: %s",
                              sum(len(r.events) for r in batch), exc)
                    self._fail(batch, JournalError(f"the database refused the events: {exc}"))
                    return
                self._set_available(False)
                delay = pauses.next()
                log.warning("event log write failed (%s); retrying in %.2f s",
                            first_line(exc), delay)
                in_doubt = in_doubt or self._commit_sent
                if not self._pause(delay):
                    self._stopped_with(batch, batch_id, in_doubt)
                    return
                retrying = True
                continue
            self._set_available(True)
            self._resolve(batch, positions)
            return

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = connect(
                self._dsn, application_name="relay-journal", **KEEPALIVES,
                options=idle_transaction_limit(self._hold_limit),
            )
            projection.prepare(self._conn)
            self._prepared = batch_sql.Prepared(self._conn)
        return self._conn

    def _probe(self) -> None:
        """Idle: does the database still answer? (Connects again when it was lost.)"""
        try:
            conn = self._connection()
            conn.execute("SELECT 1")
            conn.rollback()
        except psycopg.Error as exc:
            self._discard_connection()
            if self._available:
                log.warning("the event log's database does not answer: %s", first_line(exc))
            self._set_available(False)
            return
        self._set_available(True)

    def _write(self, batch: list[_Request], batch_id: uuid.UUID, retrying: bool) -> int:
        """One attempt; returns the position of the batch's first event.

        A small batch after one of ours that committed, with no decision to take under
        the lock, is written in ONE round trip: the head we left is assumed, and if
        another writer moved it meanwhile the insert trigger refuses the batch (a
        duplicate position, or a chain that does not continue), which only sends us the
        usual way: lock and read the head first, as every small batch does for
        SHARED_HEAD_REST after such a refusal.
        """
        conn = self._connection()
        self._commit_sent = False
        deciding = any(request.decide is not None for request in batch)
        events = [event for request in batch for event in request.events]
        small = len(events) <= batch_sql.INSERT_MAX_EVENTS and not deciding
        known, self._head = (None if retrying else self._head), None
        if known is not None and small and time.monotonic() >= self._guess_head_after:
            # Refused, the statement was its own transaction and is over: not in doubt.
            try:
                return self._write_guessed(events, batch_id, known, _fence_arrays(batch))
            except (psycopg.errors.UniqueViolation, psycopg.errors.RestrictViolation):
                self._commit_sent = False  # another writer moved the head
                self._guess_head_after = time.monotonic() + SHARED_HEAD_REST
            except psycopg.Error as exc:
                if exc.sqlstate != FENCE_SQLSTATE:
                    raise
                self._commit_sent = False  # a shard moved on: the locked path sorts the batch
        with conn.cursor() as cur:
            # BEGIN, then the head's lock: two round trips where a pipeline would take
            # one, because a pipeline ends with a flush request, after which PostgreSQL
            # no longer times the transaction as idle; this one must be ended by the
            # server's `hold_limit` if the process stops while it holds the lock.
            head = batch_sql.lock_head(cur)
            if retrying:
                # The head lock is ours, so an earlier attempt of this batch is over:
                # committed (then recorded here) or rolled back.
                found = cur.execute("SELECT first_position FROM journal_batches WHERE batch = %s",
                                    (batch_id,)).fetchone()
                if found is not None:
                    conn.rollback()
                    log.info("batch %s had committed before the connection was lost", batch_id)
                    return int(found[0])
            fenced = any(request.fences for request in batch)
            if fenced:
                _refuse_stale(cur, batch)
            if deciding:
                _decide(cur, batch)
            if fenced or deciding:
                events = [event for request in batch for event in request.events]
                if not events:  # every decision was: nothing to write (or all refused)
                    conn.rollback()
                    self._head = head
                    return head[0] + 1
            return self._write_locked(conn, cur, events, batch_id, head)

    def _write_guessed(self, events: list[batch_sql.Encoded], batch_id: uuid.UUID,
                       head: tuple[int, bytes],
                       fences: tuple[list[int], list[int]] | None) -> int:
        """A small batch after `head`, the head our last commit left, as ONE statement
        that is its own transaction: its first parts take the head lock and check the
        batch's `fences` under it, before any event goes in. psycopg's pipeline (BEGIN,
        lock, statement, COMMIT) cost about as much of the writer's CPU as the rest of a
        lone commit; one statement outside a transaction is one round trip and one
        result (`batch_sql.Prepared`)."""
        first = head[0] + 1
        position, last, patch, rows = batch_sql.event_columns(events, *head)
        statement = batch_sql.one_statement(rows, patch, [batch_id, first, position],
                                            take_lock=True, fences=fences,
                                            extra=self._prune_due())
        # Its COMMIT is the statement's end: in doubt from here if the answer is lost.
        self._commit_sent = True
        assert self._prepared is not None, "made with the connection"
        inserted = self._prepared.run(statement)
        if inserted != len(events):
            raise JournalError(f"batch {batch_id}: {inserted} of {len(events)} events "
                               "inserted: the log's head row is missing (tampered schema?)")
        self._head = (position, last)
        return first

    def _write_locked(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any],
                      events: list[batch_sql.Encoded], batch_id: uuid.UUID,
                      head: tuple[int, bytes]) -> int:
        """The batch after `head`, in the transaction that holds the head lock, up to
        COMMIT."""
        first = head[0] + 1
        rows: list[arrays.BinaryArray] | None = None
        if len(events) <= batch_sql.INSERT_MAX_EVENTS:
            position, last, patch, rows = batch_sql.event_columns(events, *head)
        else:
            position, last, patch = batch_sql.copy_events(cur, events, *head)
            patch.copy(cur)
        # The rest returns nothing: one round trip up to and including COMMIT, whose
        # fate is in doubt from here if the connection is lost before its answer.
        self._commit_sent = True
        with conn.pipeline():
            if rows is not None:
                cur.execute(*batch_sql.one_statement(rows, patch, [batch_id, first, position],
                                                     extra=self._prune_due()))
            else:
                patch.merge(cur)
                cur.execute(batch_sql.RECORD_BATCH_SQL, (batch_id, first, position))
                for statement in self._prune_due():
                    cur.execute(*statement)
            conn.commit()
        self._head = (position, last)
        return first

    def _prune_due(self) -> list[tuple[str, list[Any]]]:
        """Every PRUNE_EVERY-th commit also forgets old batch records."""
        self._batches += 1
        if self._batches % PRUNE_EVERY:
            return []
        return [("DELETE FROM journal_batches WHERE committed_at < now() - %s::interval",
                 [BATCH_RETENTION])]

    def _stopped_with(self, batch: list[_Request], batch_id: uuid.UUID, in_doubt: bool) -> None:
        """The stop deadline passed with `batch` unconfirmed: say what is known of it."""
        count = sum(len(r.events) for r in batch)
        if not in_doubt:
            self._fail(batch, JournalStopped("the database was unavailable until the Journal "
                                             "stopped: these events are not in the log"))
            return
        log.error("batch %s (%d events): fate unknown (its COMMIT was sent and the answer "
                  "lost); it is settled at the next start", batch_id, count)
        if self._unsettled is not None:
            with contextlib.suppress(OSError):
                self._unsettled.parent.mkdir(parents=True, exist_ok=True)
                with self._unsettled.open("a") as record:
                    record.write(f"{batch_id}:{count}\n")
        self._fail(batch, JournalStopped(
            f"the Journal stopped with these events' fate unknown (batch {batch_id}: its "
            "COMMIT was sent, the answer lost); settled at the next start"))

    def _pause(self, delay: float) -> bool:
        """Sleep before a retry; False when stop()'s deadline comes first."""
        end = time.monotonic() + delay
        with self._cond:
            while (now := time.monotonic()) < min(end, self._stop_deadline):
                self._cond.wait(min(end, self._stop_deadline) - now)
            return now < self._stop_deadline

    def _discard_connection(self) -> None:
        self._head, self._prepared = None, None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _set_available(self, available: bool) -> None:
        if available != self._available:
            log.log(logging.INFO if available else logging.ERROR,
                    "event log database %s", "available again" if available else "unavailable")
        self._available = available
        metrics.DATABASE_UP.set(1 if available else 0)

    @staticmethod
    def _resolve(batch: list[_Request], first: int) -> None:
        now = time.monotonic()
        metrics.APPEND_BATCH_SIZE.observe(sum(len(r.events) for r in batch))
        position = first
        for request in batch:
            count = len(request.events)
            metrics.APPEND_LATENCY.observe(now - request.enqueued)
            if request.refused:
                shards = sorted(shard for shard, _ in request.fences)
                metrics.FENCED_OUTCOMES.inc(request.refused)
                log.warning("refused %d outcome event(s) of shard(s) %s: the lease moved to "
                            "another process (a newer epoch) while they were sent",
                            request.refused, shards)
                request.future.set_exception(Fenced(f"shard(s) {shards}: the lease moved on"))
            elif request.decide is not None:
                request.future.set_result(request.decided)
            else:
                request.future.set_result(list(range(position, position + count)))
            position += count

    @staticmethod
    def _fail(batch: list[_Request], error: Exception) -> None:
        for request in batch:
            future = request.future
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(error)
