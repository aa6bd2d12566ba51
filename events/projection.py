"""Projections: the state the log implies, as a pure fold and as the cache tables.

One set of rules, `State.apply`, decides what every event does to a device and to a
run. The Journal uses it inside each append transaction (fold the batch into a
patch and lay it over the tables, set-based: `BatchPatch`), and the audit uses it
to fold the whole log in memory (`--verify` compares that fold with the tables,
`rebuild` writes it; worker processes fold slices into patches that are merged).
Sharing the code is what makes "the tables equal the fold" a meaningful check of
the tables rather than of two implementations.

Per event type (see schema/002_projections.sql for the columns):
- device_registered: active, registered_at_ms = event time (a repeat registration
  moves it; a registration revives an unregistered token and clears
  unregistered_at_ms and cause). Delivery state is kept.
- device_unregistered: inactive, unregistered_at_ms = event time, cause.
- unregister_skipped, relay_halted: no state change.
- notification_delivered / _failed / _abandoned: the token's delivery state becomes
  (run, attempts, next_attempt_at_ms, apns_id, final) of this event: delivered and
  abandoned are final; a failure is final 'dead' when its verdict is dead_token,
  otherwise it leaves next_attempt_at_ms (None when no retry follows). Run counters:
  delivered/abandoned +1, failed +1 per failed attempt, unregistered +1 per
  dead-token failure.
- run_started: the run's started_at_ms and tokens. run_finished: finished_at_ms and
  the counts the event carries (they replace the running counts).
A token event for a token never registered still creates its row (inactive), so
the tables reflect every token the log mentions.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from events import codec
from events import types as ev

# The verdict (relay.apns.reasons.Verdict.DEAD_TOKEN) that ends a token's run as 'dead'.
VERDICT_DEAD_TOKEN = "dead_token"
FINAL_DELIVERED = "delivered"
FINAL_ABANDONED = "abandoned"
FINAL_DEAD = "dead"

# A device row, in the column order of the `devices` table after `token`:
# (active, registered_at_ms, unregistered_at_ms, cause,
#  run, attempts, next_attempt_at_ms, apns_id, final)
# Plain tuples, not dataclasses: the audit folds millions of events through them.
DeviceRow = tuple[bool, "int | None", "int | None", "str | None",
                  "int | None", int, "int | None", "str | None", "str | None"]
NEW_DEVICE: DeviceRow = (False, None, None, None, None, 0, None, None, None)
DEVICE_COLUMNS = ("active", "registered_at_ms", "unregistered_at_ms", "cause",
                  "run", "attempts", "next_attempt_at_ms", "apns_id", "final")

# A run row after `run`: (started_at_ms, finished_at_ms, tokens, delivered, failed,
# abandoned, unregistered)
RunRow = tuple["int | None", "int | None", int, int, int, int, int]
NEW_RUN: RunRow = (None, None, 0, 0, 0, 0, 0)
RUN_COLUMNS = ("started_at_ms", "finished_at_ms", "tokens", "delivered", "failed",
               "abandoned", "unregistered")

DEVICE_EVENTS = frozenset({
    ev.DEVICE_REGISTERED, ev.DEVICE_UNREGISTERED, ev.NOTIFICATION_DELIVERED,
    ev.NOTIFICATION_FAILED, ev.NOTIFICATION_ABANDONED,
})
RUN_EVENTS = frozenset({
    ev.RUN_STARTED, ev.RUN_FINISHED, ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_FAILED,
    ev.NOTIFICATION_ABANDONED,
})

_minute_cache: dict[str, int] = {}


def time_ms(text: str) -> int:
    """Epoch ms of an event time; fast for the `iso_ms` form (minutes are cached)."""
    # "2026-11-25T19:43:17.123Z": the minute prefix repeats across millions of events.
    if len(text) == 24 and text[19] == "." and text[23] == "Z":
        minute = _minute_cache.get(text[:16])
        if minute is None:
            moment = datetime.fromisoformat(text[:16] + "+00:00")
            minute = int(moment.timestamp()) * 1000
            if len(_minute_cache) > 100_000:
                _minute_cache.clear()
            _minute_cache[text[:16]] = minute
        return minute + int(text[17:19]) * 1000 + int(text[20:23])
    return ev.parse_iso_ms(text)


def _optional_time(text: str | None) -> int | None:
    return None if text is None else time_ms(text)


class _Keep:
    """The marker of a column a partial fold leaves as it is (see `State(patch=True)`)."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return "KEEP"  # unpickles as this module's singleton, so `is KEEP` holds


KEEP: Any = _Keep()
_KEEP_DEVICE: DeviceRow = (KEEP, KEEP, KEEP, KEEP, KEEP, KEEP, KEEP, KEEP, KEEP)
_KEEP_RUN: RunRow = (KEEP, KEEP, KEEP, 0, 0, 0, 0)


class State:
    """Devices and runs as a fold of events; `apply` holds every projection rule.

    `patch=True` folds a slice of the log with no knowledge of what came before: rows
    start as KEEP markers (and run counts at 0), so the result says which columns the
    slice decides. Every device rule sets columns to values from the event, never from
    the old row, so a device patch is exact; run counts are increments unless the slice
    holds the run's run_finished (`finished_runs`), after which they are absolute.
    `merge` lays such a patch over the state before the slice.
    """

    __slots__ = ("_new_device", "_new_run", "devices", "finished_runs", "runs")

    def __init__(self, *, patch: bool = False) -> None:
        self.devices: dict[str, DeviceRow] = {}
        self.runs: dict[int, RunRow] = {}
        self.finished_runs: set[int] = set()
        self._new_device = _KEEP_DEVICE if patch else NEW_DEVICE
        self._new_run = _KEEP_RUN if patch else NEW_RUN

    def merge(self, patch: State) -> None:
        """Apply a later slice's patch (see the class docstring) onto this state."""
        devices = self.devices
        for token, row in patch.devices.items():
            base = devices.get(token, NEW_DEVICE)
            if row[0] is KEEP:  # no registration event in the slice
                devices[token] = base if row[4] is KEEP else base[:4] + row[4:]
            elif row[4] is KEEP and row[1] is not KEEP:  # registration columns only
                devices[token] = row[:4] + base[4:]
            else:
                devices[token] = tuple(  # type: ignore[assignment]
                    b if r is KEEP else r for r, b in zip(row, base, strict=True))
        for number, run in patch.runs.items():
            base_run = self.runs.get(number, NEW_RUN)
            heads = tuple(b if r is KEEP else r for r, b in zip(run[:3], base_run[:3],
                                                                 strict=True))
            counts = (run[3:] if number in patch.finished_runs
                      else tuple(b + r for r, b in zip(run[3:], base_run[3:], strict=True)))
            self.runs[number] = heads + counts  # type: ignore[assignment]
        self.finished_runs |= patch.finished_runs

    def apply(self, type_: str, data: Mapping[str, Any]) -> None:
        if type_ in DEVICE_EVENTS:
            self.apply_device(type_, data)
        if type_ in RUN_EVENTS:
            self.apply_run(type_, data)

    def apply_device(self, type_: str, data: Mapping[str, Any]) -> None:
        token: str = data["token"]
        (active, registered, unregistered, cause,
         run, attempts, next_at, apns_id, final) = self.devices.get(token, self._new_device)
        if type_ == ev.DEVICE_REGISTERED:
            active, registered, unregistered, cause = True, time_ms(data["at"]), None, None
        elif type_ == ev.DEVICE_UNREGISTERED:
            active, unregistered, cause = False, time_ms(data["at"]), data["cause"]
        elif type_ == ev.NOTIFICATION_DELIVERED:
            run, attempts, next_at = data["run"], data["attempt"], None
            apns_id, final = data["apns_id"], FINAL_DELIVERED
        elif type_ == ev.NOTIFICATION_FAILED:
            run, attempts, apns_id = data["run"], data["attempt"], data["apns_id"]
            if data["verdict"] == VERDICT_DEAD_TOKEN:
                next_at, final = None, FINAL_DEAD
            else:
                next_at, final = _optional_time(data["next_attempt_at"]), None
        else:  # notification_abandoned
            run, attempts, next_at = data["run"], data["attempts"], None
            apns_id, final = data["apns_id"], FINAL_ABANDONED
        self.devices[token] = (active, registered, unregistered, cause,
                               run, attempts, next_at, apns_id, final)

    def apply_run(self, type_: str, data: Mapping[str, Any]) -> None:
        number: int = data["run"]
        (started, finished, tokens, delivered, failed,
         abandoned, unregistered) = self.runs.get(number, self._new_run)
        if type_ == ev.NOTIFICATION_DELIVERED:
            delivered += 1
        elif type_ == ev.NOTIFICATION_FAILED:
            failed += 1
            if data["verdict"] == VERDICT_DEAD_TOKEN:
                unregistered += 1
        elif type_ == ev.NOTIFICATION_ABANDONED:
            abandoned += 1
        elif type_ == ev.RUN_STARTED:
            started, tokens = time_ms(data["at"]), data["tokens"]
        else:  # run_finished
            self.finished_runs.add(number)
            finished, tokens = time_ms(data["at"]), data["tokens"]
            delivered, failed = data["delivered"], data["failed"]
            abandoned, unregistered = data["abandoned"], data["unregistered"]
        self.runs[number] = (started, finished, tokens, delivered, failed,
                             abandoned, unregistered)


# --- the cache tables ----------------------------------------------------------------
# Every device rule above sets columns to values carried by the event, never to a
# value computed from the old row. So a batch folded onto rows of KEEP markers gives,
# per token, exactly the columns the batch decides (a mask) and their values, and the
# tables can be updated without reading the devices first. Run counters add to the old
# values unless the batch finished the run: the same patch semantics, applied by SQL.


PATCH_TABLE = "projection_device_patch"
_CREATE_PATCH_TABLE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {PATCH_TABLE} (mask int4 NOT NULL, LIKE devices)"
    " ON COMMIT DELETE ROWS"
)
_COPY_PATCH = (
    f"COPY {PATCH_TABLE} (mask, token, {', '.join(DEVICE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
)
# One statement per batch: tokens already in the table get the columns the batch
# decides (the mask), tokens new to it get the whole row (KEEP columns arrive holding
# NEW_DEVICE's values). MERGE (PostgreSQL 15+) probes the primary key once per token,
# where UPDATE ... FROM then INSERT ... ON CONFLICT probed twice for every new token.
_MERGE_PATCH = (
    f"MERGE INTO devices d USING {PATCH_TABLE} p ON d.token = p.token"
    " WHEN MATCHED THEN UPDATE SET "
    + ", ".join(f"{c} = CASE WHEN p.mask & {1 << i} <> 0 THEN p.{c} ELSE d.{c} END"
                for i, c in enumerate(DEVICE_COLUMNS))
    + f" WHEN NOT MATCHED THEN INSERT (token, {', '.join(DEVICE_COLUMNS)})"
    f" VALUES (p.token, {', '.join('p.' + c for c in DEVICE_COLUMNS)})"
)
_RUN_ARRAYS = ("SELECT * FROM unnest(%b::int8[], %b::int8[], %b::int8[], %b::int4[], %b::int4[],"
               " %b::int4[], %b::int4[], %b::int4[])")
# `State.merge` for runs, in SQL, so a batch writes its runs without reading them first.
# A patch's started_at_ms / finished_at_ms are NULL when the batch has no run_started /
# run_finished (their values are never NULL), and tokens is decided by either event;
# counts are increments, or absolute once the batch holds the run_finished.
_MERGE_RUN_PATCH = (
    f"INSERT INTO runs AS r (run, {', '.join(RUN_COLUMNS)}) {_RUN_ARRAYS}"
    " ON CONFLICT (run) DO UPDATE SET"
    " started_at_ms = coalesce(EXCLUDED.started_at_ms, r.started_at_ms),"
    " finished_at_ms = coalesce(EXCLUDED.finished_at_ms, r.finished_at_ms),"
    " tokens = CASE WHEN EXCLUDED.started_at_ms IS NULL AND EXCLUDED.finished_at_ms IS NULL"
    " THEN r.tokens ELSE EXCLUDED.tokens END, "
    + ", ".join(f"{c} = CASE WHEN EXCLUDED.finished_at_ms IS NULL THEN r.{c} + EXCLUDED.{c}"
                f" ELSE EXCLUDED.{c} END" for c in RUN_COLUMNS[3:])
)
_UPSERT_RUNS = (
    f"INSERT INTO runs (run, {', '.join(RUN_COLUMNS)}) {_RUN_ARRAYS}"
    " ON CONFLICT (run) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in RUN_COLUMNS)
)


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Per connection, before the first `BatchPatch.copy`: the session's patch table, and
    joins by index only. A batch touches at most a few thousand of possibly millions of
    devices; without statistics on the patch table the planner may hash the whole
    devices table for every batch instead (measured: 30-80 ms per batch at 30k devices,
    against 5 ms probing the primary key)."""
    conn.execute(_CREATE_PATCH_TABLE)
    conn.execute("SET enable_hashjoin = off")
    conn.execute("SET enable_mergejoin = off")
    conn.commit()


class BatchPatch:
    """A batch's changes to the cache tables, computed without the database.

    Laid over the tables inside the batch's append transaction (the head is locked, so
    no other writer changes these rows meanwhile): `copy` sends the device rows to the
    session's patch table, then `merge` sends one MERGE into devices and one upsert of
    the runs, two statements that return nothing, so a caller may pipeline them with
    its own up to COMMIT.
    """

    __slots__ = ("device_count", "device_rows", "runs")

    def __init__(self, batch: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        state = State(patch=True)
        apply = state.apply
        for type_, data in batch:
            apply(type_, data)
        self.device_count = len(state.devices)
        self.device_rows = _patch_rows(state.devices) if state.devices else b""
        self.runs = _run_columns(
            (number, (None if started is KEEP else started, None if finished is KEEP else finished,
                      0 if tokens is KEEP else tokens, *counts))
            for number, (started, finished, tokens, *counts) in state.runs.items())

    def copy(self, cur: psycopg.Cursor[Any]) -> None:
        if self.device_count:
            with cur.copy(_COPY_PATCH) as copy:
                copy.write(self.device_rows)

    def merge(self, cur: psycopg.Cursor[Any]) -> None:
        if self.device_count:
            # Planned afresh each time (no prepared statement): a generic plan made while
            # `devices` was small would keep scanning it whole as it grows.
            cur.execute(_MERGE_PATCH, prepare=False)
        if self.runs:
            cur.execute(_MERGE_RUN_PATCH, self.runs)


def _run_columns(rows: Iterable[tuple[int, Sequence[Any]]]) -> list[list[Any]]:
    """Run rows as the column arrays `_RUN_ARRAYS` takes."""
    return [list(column) for column in zip(*((run, *row) for run, row in rows), strict=True)]


_DELIVERY_MASK = 0b111110000  # the five delivery columns, nothing of the registration
# The start of a delivery-only patch row, up to the token: field count, mask.
_DELIVERY_ROW = codec.copy_row_header(2 + len(DEVICE_COLUMNS)) + codec.copy_int4(_DELIVERY_MASK)
_NO_REGISTRATION = (codec.copy_bool(False) + codec.copy_int8(None) + codec.copy_int8(None)
                    + codec.copy_text(None))
_REGISTRATION_ROW = codec.copy_row_header(2 + len(DEVICE_COLUMNS)) + codec.copy_int4(0b1111)
_NO_DELIVERY = (codec.copy_int8(None) + codec.copy_int4(0) + codec.copy_int8(None)
                + codec.copy_text(None) + codec.copy_text(None))
_RUN_AND_ATTEMPTS = struct.Struct(">iqii").pack
_FINAL_FIELDS = {final: codec.copy_text(final)
                 for final in (None, FINAL_DELIVERED, FINAL_ABANDONED, FINAL_DEAD)}


def _patch_rows(devices: Mapping[str, DeviceRow]) -> bytes:
    """Binary COPY data: (mask, token, columns), KEEP columns holding NEW_DEVICE's value."""
    parts = [codec.COPY_SIGNATURE]
    header = codec.copy_row_header(2 + len(DEVICE_COLUMNS))
    text, int8, int4 = codec.copy_text, codec.copy_int8, codec.copy_int4
    run_and_attempts, finals = _RUN_AND_ATTEMPTS, _FINAL_FIELDS
    for token, row in devices.items():
        (active, registered, unregistered, cause, run, attempts, next_at,
         apns_id, final) = row
        if active is KEEP and run is not KEEP:  # the common case in a run: delivery only
            parts += (_DELIVERY_ROW, text(token), _NO_REGISTRATION,
                      run_and_attempts(8, run, 4, attempts), int8(next_at), text(apns_id),
                      finals[final])
            continue
        if run is KEEP and registered is not KEEP:  # registration only, e.g. a new device
            parts += (_REGISTRATION_ROW, text(token), codec.copy_bool(active), int8(registered),
                      int8(unregistered), text(cause), _NO_DELIVERY)
            continue
        mask = 0
        values: list[Any] = list(row)
        for i, value in enumerate(row):
            if value is KEEP:
                values[i] = NEW_DEVICE[i]
            else:
                mask |= 1 << i
        (active, registered, unregistered, cause, run, attempts, next_at,
         apns_id, final) = values
        parts += (header, int4(mask), text(token), codec.copy_bool(active), int8(registered),
                  int8(unregistered), text(cause), int8(run), int4(attempts), int8(next_at),
                  text(apns_id), text(final))
    parts.append(codec.COPY_TRAILER)
    return b"".join(parts)


def write_runs(cur: psycopg.Cursor[Any], rows: Iterable[tuple[int, RunRow]]) -> None:
    """Upsert whole run rows."""
    columns = _run_columns(rows)
    if columns:
        cur.execute(_UPSERT_RUNS, columns)
