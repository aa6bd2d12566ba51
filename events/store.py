"""Readers of the log's state: short queries on the cache tables, never the whole log.

`LogReader` answers what actors need at start-up and during a run from the
projections (events/projection.py), which are committed together with the events,
so every answer is the state after some complete prefix of the log. Nothing here
loads every token: `due_tokens` is a keyset page over the partial index of active
tokens (schema/002_projections.sql).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import psycopg

from relay.database import connect, is_transient


@dataclass(frozen=True)
class TokenState:
    """A token due in a run; attempts/next_attempt_at_ms/apns_id are those of that run."""

    token: str
    attempts: int
    next_attempt_at_ms: int | None
    apns_id: str | None


@dataclass(frozen=True)
class RunRecord:
    run: int
    started_at_ms: int | None
    tokens: int
    delivered: int
    failed: int
    abandoned: int
    dead: int
    unregistered: int
    kept: int


class LogReader:
    """Thread-safe (one connection behind a lock; each call is one short query).

    A broken connection is dropped and the call fails with the psycopg error; the next
    call connects again, so callers apply their own retry policy.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def _query(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._dsn, autocommit=True,
                                     application_name="relay-log-reader")
            try:
                return self._conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                if is_transient(exc):  # the connection may be gone: a new one next time
                    self._conn.close()
                    self._conn = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def registration(self, token: str) -> tuple[bool, int | None]:
        """(active, registered_at_ms); (False, None) for a token the log never registered."""
        rows = self._query("SELECT active, registered_at_ms FROM devices WHERE token = %s",
                           (token,))
        return (bool(rows[0][0]), rows[0][1]) if rows else (False, None)

    def unfinished_run(self) -> RunRecord | None:
        """The last run with a run_started and no run_finished (to resume after a restart)."""
        rows = self._query(
            "SELECT run, started_at_ms, tokens, delivered, failed, abandoned, dead,"
            " unregistered, kept"
            " FROM runs WHERE started_at_ms IS NOT NULL AND finished_at_ms IS NULL"
            " ORDER BY run DESC LIMIT 1")
        return RunRecord(*rows[0]) if rows else None

    def next_run_number(self) -> int:
        rows = self._query("SELECT coalesce(max(run), 0) + 1 FROM runs")
        return int(rows[0][0])

    def active_count(self) -> int:
        rows = self._query("SELECT count(*) FROM devices WHERE active")
        return int(rows[0][0])

    def due_tokens(self, run: int, after: str, limit: int) -> list[TokenState]:
        """A keyset page (ORDER BY token, token > after) of active tokens with no final
        outcome in `run`; pass "" for the first page and the last token for the next."""
        rows = self._query(
            "SELECT token,"
            "       CASE WHEN run = %(run)s THEN attempts ELSE 0 END,"
            "       CASE WHEN run = %(run)s THEN next_attempt_at_ms END,"
            "       CASE WHEN run = %(run)s THEN apns_id END"
            "  FROM devices"
            " WHERE active AND token > %(after)s"
            "   AND (run IS DISTINCT FROM %(run)s OR final IS NULL)"
            " ORDER BY token LIMIT %(limit)s",
            {"run": run, "after": after, "limit": limit},
        )
        return [TokenState(*row) for row in rows]
