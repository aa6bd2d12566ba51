"""The run lock: one relay process drives a wakeup run at a time, on one PostgreSQL.

Without it, `relay wakeup` started beside a supervisor in the middle of a run would
resume that same run and send its tokens twice. It is a session-level advisory lock:
PostgreSQL releases it when the holder's session ends, so a crash never leaves it held.
The session also ends when the database restarts, and the lock with it, while the holder
may still be sending; so the holder watches its session and drains its run when the
session is gone or silent (`drive_run`), and takes the run up again once the lock is its
own again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg

from actors import RunResult, WakeupRunner
from actors.pace import ProgressCallback
from events.store import LogReader
from relay.database import RetryPauses, connect, first_line, is_transient

log = logging.getLogger(__name__)

RUN_LOCK_KEY = 0x72756E73  # "runs"
# How often a process waiting for another's run lock asks again (and notices a stop).
RUN_LOCK_POLL = 0.5
# How often the holder checks that its lock's session is still there.
RUN_LOCK_CHECK = 1.0
# A check unanswered this long means the holder is cut off from the database: it stops
# sending as if the lock were lost (a dead TCP path can swallow a query for many minutes).
RUN_LOCK_SILENCE = 5.0
# The lock's session, as the server sees it: a holder whose packets stop arriving is
# probed after 10 s of silence, every 2 s, and dropped (releasing the lock) after 5 probes
# unanswered or 20 s of unacknowledged data: within ~20 s. That is longer than the holder
# takes to notice (RUN_LOCK_CHECK + RUN_LOCK_SILENCE), so the holder has stopped sending by
# the time another process can take the lock. No statement on it may take longer than 5 s.
RUN_LOCK_SESSION = (("statement_timeout", "5s"), ("tcp_keepalives_idle", "10"),
                    ("tcp_keepalives_interval", "2"), ("tcp_keepalives_count", "5"),
                    ("tcp_user_timeout", "20000"))
# The same from the holder's side (libpq's TCP keepalives), for the connection's own socket.
RUN_LOCK_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
                       "keepalives_count": 3}

@contextmanager
def run_lock(dsn: str, stopping: threading.Event,
             on_lost: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the database-wide run lock: one relay process drives a run at a time.

    Without it, `relay wakeup` started beside a supervisor in the middle of a run
    would resume that same run and send its tokens twice. A session-level advisory
    lock is released by PostgreSQL when the holder dies, so a crash never leaves it
    held. Yields False (run nothing) when `stopping` is set before the lock is ours.

    The session also ends when the database restarts, and the lock with it, while this
    process may still be driving its run. So the session is checked every
    RUN_LOCK_CHECK seconds, and `on_lost` is called (once, from another thread) when it
    is gone: the caller must stop sending (see `drive_run`).
    """
    conn = _take_run_lock(dsn, stopping)
    if conn is None:
        yield False
        return
    watch = _RunLockWatch(conn, on_lost) if on_lost is not None else None
    try:
        yield True
    finally:
        if watch is not None:
            watch.stop()
        # A session lost meanwhile (database restart) has released the lock already; one
        # that went silent may never answer again: it is dropped, not asked to unlock.
        if watch is None or not watch.lost:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK_KEY,))
        conn.close()


class _RunLockWatch:
    """Asks the session holding the run lock whether it is still there, and gives each
    answer RUN_LOCK_SILENCE seconds: a session that errs or stays silent is lost."""

    def __init__(self, conn: psycopg.Connection[Any], on_lost: Callable[[], None]) -> None:
        self._conn, self._on_lost = conn, on_lost
        self._stopping = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._watch, name="run-lock-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(RUN_LOCK_CHECK):
            answered = threading.Event()
            errors: list[psycopg.Error] = []
            threading.Thread(target=self._check, args=(answered, errors), name="run-lock-check",
                             daemon=True).start()
            if answered.wait(RUN_LOCK_SILENCE) and not errors:
                continue
            why = first_line(errors[0]) if errors else (
                f"no answer within {RUN_LOCK_SILENCE:.0f}s: cut off from the database")
            log.warning("lost the run lock with its database session (%s): draining "
                        "the run; it is taken up again once the lock is ours again", why)
            self.lost = True
            self._on_lost()
            return

    def _check(self, answered: threading.Event, errors: list[psycopg.Error]) -> None:
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            errors.append(exc)
        finally:
            answered.set()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def drive_run(dsn: str, runner: WakeupRunner, stopping: threading.Event,
              progress: ProgressCallback) -> RunResult | None:
    """Run (or resume) one wakeup under the run lock; None when stopped before the lock
    was ours. A lost lock drains the run (sends still in flight may be repeated by the
    next driver, as after a crash), then the lock is taken again and the run resumed,
    unless another process finished it meanwhile."""
    result: RunResult | None = None
    while True:
        lost: Future[None] = Future()
        with run_lock(dsn, stopping, on_lost=partial(lost.set_result, None)) as locked:
            if not locked:
                return result
            if result is not None and not _unfinished_run(dsn):
                log.info("run %s was finished by another relay process", result.run)
                return result
            result = runner.run_once(progress=progress, lost=lost)
        if (not lost.done() or result.finished or result.halted is not None
                or stopping.is_set()):
            return result


def _unfinished_run(dsn: str) -> bool:
    reader = LogReader(dsn)
    try:
        return reader.unfinished_run() is not None
    finally:
        reader.close()


def _take_run_lock(dsn: str, stopping: threading.Event) -> psycopg.Connection[Any] | None:
    """The connection holding the run lock; waits out the database and other holders."""
    pauses = RetryPauses()
    told = False
    while not stopping.is_set():
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = connect(dsn, autocommit=True, application_name="relay-run-lock",
                           **RUN_LOCK_KEEPALIVES)
            for name, value in RUN_LOCK_SESSION:
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            while not stopping.is_set():
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()
                if row and row[0]:
                    held, conn = conn, None
                    return held
                if not told:
                    log.info("another relay process is running a wakeup; waiting for it to end")
                    told = True
                stopping.wait(RUN_LOCK_POLL)
        except psycopg.Error as exc:
            if not is_transient(exc):
                raise
            delay = pauses.next()
            log.warning("cannot reach the database to start a run (%s); retrying in %.1fs",
                        first_line(exc), delay)
            stopping.wait(delay)
        finally:
            if conn is not None:
                conn.close()
    return None

