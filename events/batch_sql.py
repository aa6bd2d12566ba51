"""A batch of events as SQL: the encoding around each event's position, the hash chain,
and the two ways into the events table, with the batch's patch of the cache tables
(events/projection.py).

* A binary COPY (`copy_events`), for batches larger than INSERT_MAX_EVENTS; the patch
  then follows by its own COPY and MERGE.
* One INSERT of binary column arrays (`event_columns`, `one_statement`), for small
  batches: the cache upserts and the batch record are data-modifying WITH parts of it,
  so it can be pipelined with the COMMIT.

The Journal (events/journal.py) decides when each is used, under the head lock, and
retries; the writes without a Journal are here too: seeding a log (`append_bulk`), the
log's first event (`append_first`) and an append inside another transaction that holds
the head lock (`lock_head`, `append_locked`, for relay/cluster.py).
"""

from __future__ import annotations

import itertools
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import pq
from psycopg.generators import execute

from events import arrays, codec, projection
from events.types import EVENT_TYPES, Event
from relay.database import connect

# Events per transaction of `append_bulk`.
BULK_CHUNK = 50_000
COPY_EVENTS_SQL = "COPY events (position, type, token, run, body, hash) FROM STDIN (FORMAT BINARY)"
# Batches of at most this many events go in with one INSERT inside the commit's pipeline
# instead of a COPY (a COPY cannot be pipelined): two round trips fewer, which is most of
# what a lone request waits for on a busy machine. Beyond it, COPY's lower cost per
# event wins.
INSERT_MAX_EVENTS = 64
INSERT_EVENTS_SQL = ("INSERT INTO events (position, type, token, run, body, hash)"
                     " SELECT * FROM unnest(%b::int8[], %b::text[], %b::text[], %b::int8[],"
                     " %b::bytea[], %b::bytea[])")
RECORD_BATCH_SQL = ("INSERT INTO journal_batches (batch, first_position, last_position)"
                    " VALUES (%s, %s, %s)")
_ROW_START = struct.Struct(">hiq").pack  # 6 fields, then the position (8 bytes)
_INT4 = struct.Struct(">i").pack
_HASH_LENGTH = _INT4(32)
_TYPE_FIELDS = {type_: codec.copy_text(type_) for type_ in EVENT_TYPES}


class Encoded(NamedTuple):
    """An event checked and encoded in its appender's thread, before its position is known."""

    type: str
    data: Any
    prefix: bytes  # canonical bytes before the position's digits
    suffix: bytes  # and after them
    columns: bytes  # the type, token and run fields of its COPY row


def copy_events(cur: psycopg.Cursor[Any], events: Sequence[Encoded], head: int,
                 previous: bytes) -> tuple[int, bytes, projection.BatchPatch]:
    """COPY events after the locked head (position `head`, hash `previous`); returns the
    last position and hash and the batch's patch of the cache tables, still to be applied."""
    position = head
    sha256, start, int4 = codec.chain_hash, _ROW_START, _INT4
    # Every row is built before the COPY starts, and sent in one write: PostgreSQL does not
    # time a COPY that waits for its client's rows (neither statement_timeout nor the idle
    # limit ends it), so a process paused while streaming rows would hold the head lock
    # until it resumed; paused between statements, its transaction ends at its hold limit.
    rows = [codec.COPY_SIGNATURE]
    for event in events:
        position += 1
        body = b"%s%d%s" % (event.prefix, position, event.suffix)
        previous = sha256(previous, body)
        rows += (start(6, 8, position), event.columns, int4(len(body)), body,
                 _HASH_LENGTH, previous)
    rows.append(codec.COPY_TRAILER)
    patch = projection.BatchPatch((event.type, event.data) for event in events)
    with cur.copy(COPY_EVENTS_SQL) as copy:
        copy.write(b"".join(rows))
    return position, previous, patch


def event_columns(events: Sequence[Encoded], head: int, previous: bytes
                   ) -> tuple[int, bytes, projection.BatchPatch, list[arrays.BinaryArray]]:
    """`copy_events` for `INSERT_EVENTS_SQL`: the last position and hash, the patch (its
    rows inline), and the events as column arrays (position, type, token, run, body, hash)."""
    positions, types, tokens, runs, bodies, hashes = [], [], [], [], [], []
    position, sha256 = head, codec.chain_hash
    int8, text, field = codec.copy_int8, codec.copy_text, codec.copy_bytes
    for event in events:
        position += 1
        body = b"%s%d%s" % (event.prefix, position, event.suffix)
        previous = sha256(previous, body)
        positions.append(int8(position))
        types.append(_TYPE_FIELDS[event.type])
        tokens.append(text(event.data.get("token")))
        runs.append(int8(event.data.get("run")))
        bodies.append(field(body))
        hashes.append(field(previous))
    patch = projection.BatchPatch(((event.type, event.data) for event in events), inline=True)
    columns = [arrays.array(arrays.Int8Array, positions), arrays.array(arrays.TextArray, types),
               arrays.array(arrays.TextArray, tokens), arrays.array(arrays.Int8Array, runs),
               arrays.array(arrays.ByteaArray, bodies), arrays.array(arrays.ByteaArray, hashes)]
    return position, previous, patch, columns


def one_statement(rows: list[arrays.BinaryArray], patch: projection.BatchPatch,
                  record: list[Any], *, take_lock: bool = False,
                  fences: tuple[list[int], list[int]] | None = None,
                  extra: Sequence[tuple[str, list[Any]]] = ()) -> tuple[str, list[Any]]:
    """A small batch's writes as ONE statement: the cache upserts, the batch record and
    `extra` as data-modifying WITH parts of the events INSERT. Each statement is a send,
    a result to process and, on a busy process, a wait for the GIL after its poll; the
    insert trigger still runs at the end of the statement, after every part.

    `take_lock`: the statement takes the head lock itself, and checks `fences` (the
    batch's shards and epochs) under it, before any event is inserted: the INSERT's rows
    are gated on those parts, so PostgreSQL evaluates them once, first. Without a head
    row no event is inserted (the caller compares the row count)."""
    guard: list[tuple[str, list[Any]]] = []
    if take_lock:
        guard.append(("SELECT 1 FROM log_head FOR UPDATE", []))
        if fences is not None:
            shards, epochs = fences
            guard.append(("SELECT cluster_fence(%b::int4[], %b::int8[]) FROM w0",
                          [arrays.of_values(arrays.Int4Array, shards),
                           arrays.of_values(arrays.Int8Array, epochs)]))
    else:
        assert fences is None, "fences are checked under the lock the statement takes"
    parts = [*guard, *patch.statements(), (RECORD_BATCH_SQL, record), *extra]
    text = "WITH " + ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(parts))
    params = [param for _, values in parts for param in values]
    gate = f" WHERE EXISTS (SELECT FROM w{len(guard) - 1})" if guard else ""
    return f"{text} {INSERT_EVENTS_SQL}{gate}", params + rows


class Prepared:
    """`one_statement`s sent through libpq's extended protocol as statements prepared once
    per connection, their parameters already binary: psycopg's cursor, which adapts every
    parameter and keeps its results, was a third of the Journal's CPU per lone commit.

    Sent outside any transaction, a statement is its own: PostgreSQL commits it at the
    Sync that ends it, so its answer is its COMMIT's."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._names: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._made = itertools.count()  # never a name twice, whatever the server kept

    def run(self, statement: tuple[str, list[Any]]) -> int:
        """Run `statement` as its own transaction; the rows its INSERT wrote. A refusal
        raises psycopg's error for its SQLSTATE, as `Cursor.execute` would."""
        text, params = statement
        values, types = [], []
        for param in params:
            value, oid = _binary(param)
            values.append(value)
            types.append(oid)
        conn, pgconn = self._conn, self._conn.pgconn
        if pgconn.transaction_status != pq.TransactionStatus.IDLE:
            conn.rollback()  # else the statement would join that transaction
        key = (text, tuple(types))
        try:
            return self._execute(self._names.get(key) or self._prepare(key, types), values)
        except psycopg.errors.InvalidSqlStatementName:
            # After a ROLLBACK psycopg resets its own cache of prepared statements with
            # DEALLOCATE ALL, which takes ours too. Bind failed: nothing ran.
            self._names.clear()
            return self._execute(self._prepare(key, types), values)

    def _prepare(self, key: tuple[str, tuple[int, ...]], types: list[int]) -> bytes:
        name = b"relay_batch_%d" % next(self._made)
        pgconn = self._conn.pgconn
        pgconn.send_prepare(name, _numbered(key[0]).encode(), param_types=types)
        self._result(self._conn.wait(execute(pgconn)))
        self._names[key] = name
        return name

    def _execute(self, name: bytes, values: list[bytes]) -> int:
        pgconn = self._conn.pgconn
        pgconn.send_query_prepared(name, values, param_formats=[pq.Format.BINARY] * len(values))
        return self._result(self._conn.wait(execute(pgconn))).command_tuples or 0

    def _result(self, results: list[pq.abc.PGresult]) -> pq.abc.PGresult:
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self._conn.info.encoding)
        if not results:
            raise psycopg.InternalError("no result from the statement")
        return results[-1]


_PLACEHOLDER = re.compile(r"%[bs]")
_INT8 = struct.Struct(">q").pack
_UUID_OID, _INT8_OID, _TEXT_OID = 2950, 20, 25


def _numbered(text: str) -> str:
    """psycopg's %b / %s placeholders as PostgreSQL's $1, $2, ..."""
    numbers = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", text)


def _binary(value: Any) -> tuple[bytes, int]:
    """A parameter of `one_statement` in binary, with its type."""
    if isinstance(value, arrays.BinaryArray):
        return value, value.array_oid
    if isinstance(value, uuid.UUID):
        return value.bytes, _UUID_OID
    if isinstance(value, int) and not isinstance(value, bool):
        return _INT8(value), _INT8_OID
    if isinstance(value, str):
        return value.encode(), _TEXT_OID
    raise TypeError(f"no binary form for a parameter of type {type(value).__name__}")


def encode(event: Event) -> Encoded:
    """Checked and encoded in the appender's thread: canonical bytes around the position."""
    codec.check_event(event)
    prefix, suffix = codec.template(event.type, event.data)
    columns = (_TYPE_FIELDS[event.type] + codec.copy_text(event.data.get("token"))
               + codec.copy_int8(event.data.get("run")))
    return Encoded(event.type, event.data, prefix, suffix, columns)


def append_bulk(dsn: str, events: Iterable[Event], *, chunk: int = BULK_CHUNK) -> int:
    """Append many events at once (seeding a log, benchmarks); returns how many.

    The Journal's format, chain, head lock and cache tables, `chunk` events per
    transaction, without group commit or retries. Safe next to a running Journal (the
    head lock orders them); a failure leaves the chunks committed before it.
    """
    appended = 0
    with connect(dsn, application_name="relay-append-bulk") as conn:
        projection.prepare(conn)
        remaining = iter(events)
        while batch := list(itertools.islice(remaining, chunk)):
            with conn.cursor() as cur:
                append_locked(cur, batch, lock_head(cur))
            conn.commit()
            appended += len(batch)
    return appended


def lock_head(cur: psycopg.Cursor[Any]) -> tuple[int, bytes]:
    """Take the head lock in the caller's transaction: the head's (position, hash)."""
    row = cur.execute("SELECT position, hash FROM log_head FOR UPDATE").fetchone()
    assert row is not None, "log_head has exactly one row"
    return int(row[0]), bytes(row[1])


# The holder of the head lock when it is a relay session that has waited on its client for
# longer than a limit: between the messages of one write (a pipeline before its Sync, a COPY
# before its rows), where PostgreSQL times nothing, so a paused process would keep the lock
# for as long as it stays paused. Ended by the caller (pg_terminate_backend).
_END_STALLED_HOLDER_SQL = (
    "SELECT a.pid, a.application_name, extract(epoch FROM now() - a.state_change)::float8,"
    " pg_terminate_backend(a.pid)"
    " FROM pg_stat_activity a"
    " WHERE a.backend_xid = (SELECT xmax FROM log_head)"
    " AND a.pid <> pg_backend_pid() AND a.application_name LIKE 'relay%%'"
    " AND a.wait_event_type = 'Client' AND a.wait_event = 'ClientRead'"
    " AND a.state_change < now() - make_interval(secs => %s)")


def end_stalled_head_holder(cur: psycopg.Cursor[Any], limit: float
                            ) -> tuple[int, str, float] | None:
    """End the session of a relay that holds the head lock while it has waited `limit`
    seconds or more for its own process to send the rest of a write: (pid,
    application_name, seconds waited) of the session ended, or None. Its transaction rolls
    back; its process, once running again, settles that batch as any COMMIT in doubt.
    A session that works, or waits on anything but its client, is never ended."""
    row = cur.execute(_END_STALLED_HOLDER_SQL, (limit,)).fetchone()
    if row is None or not row[3]:
        return None
    return int(row[0]), str(row[1]), float(row[2])


def append_locked(cur: psycopg.Cursor[Any], events: Sequence[Event],
                  head: tuple[int, bytes]) -> None:
    """Append `events` after `head` in the caller's transaction, which holds the head
    lock (`lock_head`) and whose connection was `projection.prepare`d: for decisions
    taken with other rows in the same transaction (relay/cluster.py)."""
    if events:
        _, _, patch = copy_events(cur, [encode(event) for event in events], *head)
        patch.copy(cur)
        patch.merge(cur)


def append_first(dsn: str, event: Event) -> bool:
    """Append `event` as the log's first event if the log is empty; True if it did. The
    head lock decides, so of processes starting together exactly one writes it."""
    encoded = [encode(event)]
    with connect(dsn, application_name="relay-create-log") as conn:
        with conn.cursor() as cur:
            head = lock_head(cur)
            if head[0] != 0:
                return False
            copy_events(cur, encoded, *head)
        conn.commit()
    return True
