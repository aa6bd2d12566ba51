"""Projections: the state the log implies, as a pure fold and as the cache tables.

One set of rules, `State.apply`, decides what every event does to a device and to a
run. The Journal uses it inside each append transaction (fold the batch into a
patch and lay it over the tables, set-based: `apply_batch`), and the audit uses it
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
# tables can be updated without reading the devices first. Run counters do add to
# the old values: the (few) run rows of a batch are read, folded and written back.


PATCH_TABLE = "projection_device_patch"
_CREATE_PATCH_TABLE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {PATCH_TABLE} (mask int4 NOT NULL, LIKE devices)"
    " ON COMMIT DELETE ROWS"
)
_COPY_PATCH = (
    f"COPY {PATCH_TABLE} (mask, token, {', '.join(DEVICE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
)
_UPDATE_FROM_PATCH = (
    "UPDATE devices d SET "
    + ", ".join(f"{c} = CASE WHEN p.mask & {1 << i} <> 0 THEN p.{c} ELSE d.{c} END"
                for i, c in enumerate(DEVICE_COLUMNS))
    + f" FROM {PATCH_TABLE} p WHERE d.token = p.token"
)
# After the UPDATE: only tokens new to the table remain to insert.
_INSERT_FROM_PATCH = (
    f"INSERT INTO devices (token, {', '.join(DEVICE_COLUMNS)})"
    f" SELECT token, {', '.join(DEVICE_COLUMNS)} FROM {PATCH_TABLE}"
    " ON CONFLICT (token) DO NOTHING"
)
_SELECT_RUNS = f"SELECT run, {', '.join(RUN_COLUMNS)} FROM runs WHERE run = ANY(%b)"
_UPSERT_RUNS = (
    f"INSERT INTO runs (run, {', '.join(RUN_COLUMNS)})"
    " SELECT * FROM unnest(%b::int8[], %b::int8[], %b::int8[], %b::int4[], %b::int4[],"
    " %b::int4[], %b::int4[], %b::int4[])"
    " ON CONFLICT (run) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in RUN_COLUMNS)
)


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Per connection, before the first `apply_batch`: the session's patch table, and
    joins by index only. A batch touches at most a few thousand of possibly millions of
    devices; without statistics on the patch table the planner may hash the whole
    devices table for every batch instead (measured: 30-80 ms per batch at 30k devices,
    against 5 ms probing the primary key)."""
    conn.execute(_CREATE_PATCH_TABLE)
    conn.execute("SET enable_hashjoin = off")
    conn.execute("SET enable_mergejoin = off")
    conn.commit()


def apply_batch(cur: psycopg.Cursor[Any], batch: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Fold a batch of (type, data) onto the cache tables, set-based (see `DevicePatch`)."""
    apply_patch(cur, DevicePatch(batch), batch)


class DevicePatch:
    """A batch's device changes as COPY data, computed without the database (so it could
    be prepared while the previous batch commits: measured, that gained under 5%)."""

    __slots__ = ("count", "data")

    def __init__(self, batch: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        state = State(patch=True)
        apply = state.apply_device
        for type_, data in batch:
            if type_ in DEVICE_EVENTS:
                apply(type_, data)
        self.count = len(state.devices)
        self.data = _patch_rows(state.devices) if state.devices else b""


def apply_patch(cur: psycopg.Cursor[Any], patch: DevicePatch,
                batch: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Lay a batch over the cache tables, inside its append transaction (the head is
    locked, so no other writer changes these rows meanwhile). Devices: one COPY of the
    patch, one UPDATE, and one INSERT when some tokens are new (they start from
    NEW_DEVICE). Runs, whose counts grow by increments: read, fold, upsert."""
    runs = {data["run"] for type_, data in batch if type_ in RUN_EVENTS}
    if runs:
        state = State()
        cur.execute(_SELECT_RUNS, (list(runs),), binary=True)
        state.runs = {row[0]: row[1:] for row in cur}
        for type_, data in batch:
            if type_ in RUN_EVENTS:
                state.apply_run(type_, data)
        write_runs(cur, state.runs.items())
    if patch.count:
        with cur.copy(_COPY_PATCH) as copy:
            copy.write(patch.data)
        # Planned afresh each time (no prepared statement): a generic plan made while
        # `devices` was small would keep scanning it whole as it grows.
        cur.execute(_UPDATE_FROM_PATCH, prepare=False)
        if cur.rowcount < patch.count:  # some tokens are new to the table
            cur.execute(_INSERT_FROM_PATCH, prepare=False)


_DELIVERY_MASK = 0b111110000  # the five delivery columns, nothing of the registration
_NO_REGISTRATION = (codec.copy_bool(False) + codec.copy_int8(None) + codec.copy_int8(None)
                    + codec.copy_text(None))


def _patch_rows(devices: Mapping[str, DeviceRow]) -> bytes:
    """Binary COPY data: (mask, token, columns), KEEP columns holding NEW_DEVICE's value."""
    parts = [codec.COPY_SIGNATURE]
    header = codec.copy_row_header(2 + len(DEVICE_COLUMNS))
    text, int8, int4 = codec.copy_text, codec.copy_int8, codec.copy_int4
    delivery_mask = int4(_DELIVERY_MASK)
    for token, row in devices.items():
        (active, registered, unregistered, cause, run, attempts, next_at,
         apns_id, final) = row
        if active is KEEP and run is not KEEP:  # the common case in a run: delivery only
            parts += (header, delivery_mask, text(token), _NO_REGISTRATION, int8(run),
                      int4(attempts), int8(next_at), text(apns_id), text(final))
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
    columns = [list(column) for column in zip(*((run, *row) for run, row in rows), strict=True)]
    if columns:
        cur.execute(_UPSERT_RUNS, columns)
