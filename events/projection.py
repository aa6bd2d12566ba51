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
- unregister_skipped, relay_halted, log_created: no device change.
- notification_delivered / _failed / _abandoned: the token's delivery state becomes
  (run, attempts, next_attempt_at_ms, apns_id, final) of this event: delivered and
  abandoned are final; a failure is final 'dead' when its verdict is dead_token,
  otherwise it leaves next_attempt_at_ms (None when no retry follows). Run counters:
  delivered/abandoned +1, failed +1 per failed attempt, dead +1 per dead-token failure.
- device_unregistered / unregister_skipped with a run: that run's unregistered / kept +1.
- run_started: the run's started_at_ms and tokens. run_finished (upcast to its current
  shape, events/types.py): finished_at_ms, and the tokens, delivered, failed, abandoned
  and dead the event carries replace the running counts. unregistered and kept are
  always counted from the events (a v1 run_finished never recorded them).
A token event for a token never registered still creates its row (inactive), so
the tables reflect every token the log mentions.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg

from events import arrays, codec
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
# abandoned, dead, unregistered, kept)
RunRow = tuple["int | None", "int | None", int, int, int, int, int, int, int]
NEW_RUN: RunRow = (None, None, 0, 0, 0, 0, 0, 0, 0)
RUN_COLUMNS = ("started_at_ms", "finished_at_ms", "tokens", "delivered", "failed",
               "abandoned", "dead", "unregistered", "kept")

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
_KEEP_RUN: RunRow = (KEEP, KEEP, KEEP, 0, 0, 0, 0, 0, 0)
# A device row's two parts, as State keeps them apart, and their values when unset:
# registration (active, registered_at_ms, unregistered_at_ms, cause) and delivery
# (run, attempts, next_attempt_at_ms, apns_id, final).
_UNSET_PARTS: dict[bool, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    False: (NEW_DEVICE[:4], NEW_DEVICE[4:]), True: (_KEEP_DEVICE[:4], _KEEP_DEVICE[4:])}
# Positions in a run's counters (RunRow's order).
(_STARTED, _FINISHED, _TOKENS, _DELIVERED, _FAILED, _ABANDONED, _DEAD, _UNREGISTERED,
 _KEPT) = range(9)
# Counts a run_finished replaces ([_DELIVERED:_COUNTED]); the rest are always counted.
_COUNTED = _UNREGISTERED


class State:
    """Devices and runs as a fold of events; the `_on_*` rules are every projection rule.

    A device's registration columns and its delivery columns are kept apart, because
    every rule but one sets whole parts from the event alone: a delivery outcome never
    needs the old row, and the audit folds millions of them (reading and rebuilding
    whole rows was a large share of the fold). The one exception, device_unregistered, keeps
    registered_at_ms. `devices` joins the parts into rows.

    `patch=True` folds a slice of the log with no knowledge of what came before: what
    the slice does not decide is a KEEP marker (a part it never touches, the
    registered_at_ms an unregistration keeps), and run counts start at 0. Run counts
    are increments unless the slice holds the run's run_finished (`finished_runs`),
    after which those it replaces are absolute. `merge` lays such a patch over the state before it.
    """

    __slots__ = ("_patch", "_runs", "deliveries", "finished_runs", "leases", "registrations",
                 "run_apns", "run_fences")

    def __init__(self, *, patch: bool = False) -> None:
        self.registrations: dict[str, tuple[Any, ...]] = {}
        self.deliveries: dict[str, tuple[Any, ...]] = {}
        self._runs: dict[int, list[Any]] = {}
        self.finished_runs: set[int] = set()
        # Where each run sent (run_started's "apns"; None when not recorded): for the
        # audit's report, not a cache table.
        self.run_apns: dict[int, Any] = {}
        # Who drove what (relay/cluster.py), for the audit's report, not a cache table:
        # each lease (shard, epoch) -> (process, host), and per run the leases its
        # outcome events were sent under.
        self.leases: dict[tuple[int, int], tuple[str, str]] = {}
        self.run_fences: dict[int, set[tuple[int, int]]] = {}
        self._patch = patch

    @property
    def devices(self) -> dict[str, DeviceRow]:
        """Every device row the fold decides (a copy; built on each call)."""
        no_registration, no_delivery = _UNSET_PARTS[self._patch]
        deliveries = self.deliveries
        rows: dict[str, Any] = {token: registration + deliveries.get(token, no_delivery)
                                for token, registration in self.registrations.items()}
        for token, delivery in deliveries.items():
            if token not in rows:
                rows[token] = no_registration + delivery
        return rows

    def device(self, token: str) -> DeviceRow | None:
        registration, delivery = self.registrations.get(token), self.deliveries.get(token)
        if registration is None and delivery is None:
            return None
        no_registration, no_delivery = _UNSET_PARTS[self._patch]
        return (registration or no_registration) + (delivery or no_delivery)  # type: ignore[return-value]

    @property
    def runs(self) -> dict[int, RunRow]:
        """Every run row the fold decides (a copy)."""
        return {number: tuple(row) for number, row in self._runs.items()}  # type: ignore[misc]

    def merge(self, patch: State) -> None:
        """Apply a later slice's patch (see the class docstring) onto this state."""
        registrations = self.registrations
        for token, registration in patch.registrations.items():
            if registration[1] is KEEP:  # an unregistration: registered_at_ms stays
                base = registrations.get(token)
                registered = None if base is None else base[1]
                registration = (registration[0], registered, *registration[2:])
            registrations[token] = registration
        self.deliveries.update(patch.deliveries)
        for number, run in patch._runs.items():
            base_run = self._runs.get(number) or list(NEW_RUN)
            heads = [b if r is KEEP else r for r, b in zip(run[:3], base_run[:3], strict=True)]
            counted = [b + r for r, b in zip(run[3:], base_run[3:], strict=True)]
            if number in patch.finished_runs:
                counted[:_COUNTED - 3] = run[3:_COUNTED]
            self._runs[number] = heads + counted
        self.finished_runs |= patch.finished_runs
        self.run_apns.update(patch.run_apns)
        self.leases.update(patch.leases)
        for number, fences in patch.run_fences.items():
            self.run_fences.setdefault(number, set()).update(fences)

    def apply(self, type_: str, data: Mapping[str, Any]) -> None:
        rule = _RULES.get(type_)
        if rule is not None:  # relay_halted, log_created: no state change
            rule(self, data)

    def _counts(self, number: int) -> list[Any]:
        counts = self._runs.get(number)
        if counts is None:
            counts = self._runs[number] = list(_KEEP_RUN if self._patch else NEW_RUN)
        return counts

    # device_registered: active, registered_at_ms = event time (a repeat registration
    # moves it; a registration revives an unregistered token, clearing unregistered_at_ms
    # and cause). Delivery state is kept.
    def _on_registered(self, data: Mapping[str, Any]) -> None:
        self.registrations[data["token"]] = (True, time_ms(data["at"]), None, None)

    def _on_unregistered(self, data: Mapping[str, Any]) -> None:
        token = data["token"]
        old = self.registrations.get(token)
        registered = old[1] if old is not None else (KEEP if self._patch else None)
        self.registrations[token] = (False, registered, time_ms(data["at"]), data["cause"])
        if (number := data["run"]) is not None:
            self._counts(number)[_UNREGISTERED] += 1

    def _on_skipped(self, data: Mapping[str, Any]) -> None:
        if (number := data["run"]) is not None:
            self._counts(number)[_KEPT] += 1

    def _fenced(self, number: int, data: Mapping[str, Any]) -> None:
        fences = self.run_fences.get(number)
        if fences is None:
            fences = self.run_fences[number] = set()
        fences.add((data["shard"], data["epoch"]))

    def _on_leased(self, data: Mapping[str, Any]) -> None:
        self.leases[(data["shard"], data["epoch"])] = (data["process"], data["host"])

    def _on_delivered(self, data: Mapping[str, Any]) -> None:
        number = data["run"]
        if "epoch" in data:
            self._fenced(number, data)
        self.deliveries[data["token"]] = (number, data["attempt"], None, data["apns_id"],
                                          FINAL_DELIVERED)
        self._counts(number)[_DELIVERED] += 1

    def _on_failed(self, data: Mapping[str, Any]) -> None:
        number = data["run"]
        if "epoch" in data:
            self._fenced(number, data)
        counts = self._counts(number)
        counts[_FAILED] += 1
        if data["verdict"] == VERDICT_DEAD_TOKEN:
            counts[_DEAD] += 1
            next_at, final = None, FINAL_DEAD
        else:
            next_at, final = _optional_time(data["next_attempt_at"]), None
        self.deliveries[data["token"]] = (number, data["attempt"], next_at, data["apns_id"],
                                          final)

    def _on_abandoned(self, data: Mapping[str, Any]) -> None:
        number = data["run"]
        if "epoch" in data:
            self._fenced(number, data)
        self.deliveries[data["token"]] = (number, data["attempts"], None, data["apns_id"],
                                          FINAL_ABANDONED)
        self._counts(number)[_ABANDONED] += 1

    def _on_run_started(self, data: Mapping[str, Any]) -> None:
        counts = self._counts(data["run"])
        counts[_STARTED], counts[_TOKENS] = time_ms(data["at"]), data["tokens"]
        self.run_apns[data["run"]] = data.get("apns")

    def _on_run_finished(self, data: Mapping[str, Any]) -> None:
        data = ev.upcast_run_finished(data)
        number = data["run"]
        self.finished_runs.add(number)
        self._counts(number)[_FINISHED:_COUNTED] = (
            time_ms(data["at"]), data["tokens"], data["delivered"], data["failed"],
            data["abandoned"], data["dead"])


_RULES = {
    ev.DEVICE_REGISTERED: State._on_registered,
    ev.DEVICE_UNREGISTERED: State._on_unregistered,
    ev.UNREGISTER_SKIPPED: State._on_skipped,
    ev.NOTIFICATION_DELIVERED: State._on_delivered,
    ev.NOTIFICATION_FAILED: State._on_failed,
    ev.NOTIFICATION_ABANDONED: State._on_abandoned,
    ev.RUN_STARTED: State._on_run_started,
    ev.RUN_FINISHED: State._on_run_finished,
    ev.SHARD_LEASED: State._on_leased,
}


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
_MERGE_FROM = (
    "MERGE INTO devices d USING {source} p ON d.token = p.token"
    " WHEN MATCHED THEN UPDATE SET "
    + ", ".join(f"{c} = CASE WHEN p.mask & {1 << i} <> 0 THEN p.{c} ELSE d.{c} END"
                for i, c in enumerate(DEVICE_COLUMNS))
    + f" WHEN NOT MATCHED THEN INSERT (token, {', '.join(DEVICE_COLUMNS)})"
    f" VALUES (p.token, {', '.join('p.' + c for c in DEVICE_COLUMNS)})"
)
_MERGE_PATCH = _MERGE_FROM.format(source=PATCH_TABLE)
# A patch small enough to travel as parameters (no COPY, so the statement can join the
# caller's pipeline) is written with one upsert per mask instead: rows deciding the same
# columns share a fixed statement that takes only those columns (a registration: 4, a
# delivery: 5 arrays) and names the rest as NEW_DEVICE's constants. Its plan is the same
# whatever the rows (the primary key decides, no join), so PostgreSQL keeps it prepared,
# where the MERGE above was planned per batch (~0.7 ms of the server's time per commit).
_DEVICE_TYPES = ("bool", "int8", "int8", "text", "int8", "int4", "int8", "text", "text")
_upserts: dict[int, str] = {}


def _upsert_statement(mask: int) -> str:
    """INSERT ... ON CONFLICT for patch rows deciding exactly the columns in `mask`."""
    statement = _upserts.get(mask)
    if statement is None:
        decided = [i for i in range(len(DEVICE_COLUMNS)) if mask & (1 << i)]
        arrays = ", ".join(["%b::text[]"] + [f"%b::{_DEVICE_TYPES[i]}[]" for i in decided])
        names = ", ".join(["token"] + [DEVICE_COLUMNS[i] for i in decided])
        values = ", ".join(["u.token"] + [f"u.{c}" if mask & (1 << i) else _literal(NEW_DEVICE[i])
                                          for i, c in enumerate(DEVICE_COLUMNS)])
        update = ", ".join(f"{DEVICE_COLUMNS[i]} = EXCLUDED.{DEVICE_COLUMNS[i]}" for i in decided)
        statement = _upserts[mask] = (
            f"INSERT INTO devices (token, {', '.join(DEVICE_COLUMNS)})"
            f" SELECT {values} FROM unnest({arrays}) AS u({names})"
            f" ON CONFLICT (token) DO UPDATE SET {update}")
    return statement


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value))


_RUN_ARRAYS = ("SELECT * FROM unnest(%b::int8[], %b::int8[], %b::int8[], %b::int4[], %b::int4[],"
               " %b::int4[], %b::int4[], %b::int4[], %b::int4[], %b::int4[])")
# `State.merge` for runs, in SQL, so a batch writes its runs without reading them first.
# A patch's started_at_ms / finished_at_ms are NULL when the batch has no run_started /
# run_finished (their values are never NULL), and tokens is decided by either event;
# counts are increments, or (but for unregistered and kept, always counted) absolute once
# the batch holds the run_finished.
_MERGE_RUN_PATCH = (
    f"INSERT INTO runs AS r (run, {', '.join(RUN_COLUMNS)}) {_RUN_ARRAYS}"
    " ON CONFLICT (run) DO UPDATE SET"
    " started_at_ms = coalesce(EXCLUDED.started_at_ms, r.started_at_ms),"
    " finished_at_ms = coalesce(EXCLUDED.finished_at_ms, r.finished_at_ms),"
    " tokens = CASE WHEN EXCLUDED.started_at_ms IS NULL AND EXCLUDED.finished_at_ms IS NULL"
    " THEN r.tokens ELSE EXCLUDED.tokens END, "
    + ", ".join(f"{c} = CASE WHEN EXCLUDED.finished_at_ms IS NULL THEN r.{c} + EXCLUDED.{c}"
                f" ELSE EXCLUDED.{c} END" for c in RUN_COLUMNS[3:_COUNTED])
    + "".join(f", {c} = r.{c} + EXCLUDED.{c}" for c in RUN_COLUMNS[_COUNTED:])
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
    devices table for every batch instead, many times slower than probing the primary
    key (BENCHMARKS.md, "Figures behind choices in the code")."""
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

    __slots__ = ("device_count", "device_groups", "device_rows", "runs")

    def __init__(self, batch: Iterable[tuple[str, Mapping[str, Any]]], *,
                 inline: bool = False) -> None:
        """`inline`: the device rows travel as parameters of upserts (no `copy` step),
        for a small batch whose transaction is one pipeline."""
        state = State(patch=True)
        apply = state.apply
        for type_, data in batch:
            apply(type_, data)
        self.device_groups: dict[int, list[arrays.BinaryArray]] | None = None
        if inline:
            self.device_groups, self.device_count = _patch_groups(state)
            self.device_rows = b""
        else:
            self.device_rows, self.device_count = _patch_rows(state)
        self.runs = _run_columns(
            (number, (None if started is KEEP else started, None if finished is KEEP else finished,
                      0 if tokens is KEEP else tokens, *counts))
            for number, (started, finished, tokens, *counts) in state.runs.items())

    def copy(self, cur: psycopg.Cursor[Any]) -> None:
        if self.device_count and self.device_groups is None:
            with cur.copy(_COPY_PATCH) as copy:
                copy.write(self.device_rows)

    def statements(self) -> list[tuple[str, list[arrays.BinaryArray]]]:
        """An inline patch as statements with their parameters (upserts that return
        nothing), for a caller that sends them as parts of one statement of its own."""
        assert self.device_groups is not None, "only an inline patch travels as parameters"
        parts = [(_upsert_statement(mask), columns)
                 for mask, columns in self.device_groups.items()]
        if self.runs:
            parts.append((_MERGE_RUN_PATCH, self.runs))
        return parts

    def merge(self, cur: psycopg.Cursor[Any]) -> None:
        if self.device_groups is not None:
            for statement, params in self.statements():
                cur.execute(statement, params)
            return
        if self.device_count:
            # Planned afresh each time (no prepared statement): a generic plan made while
            # `devices` was small would keep scanning it whole as it grows.
            cur.execute(_MERGE_PATCH, prepare=False)
        if self.runs:
            cur.execute(_MERGE_RUN_PATCH, self.runs)


# As _RUN_ARRAYS casts them: run, started_at_ms, finished_at_ms, then the int4 counts.
_RUN_FIELDS: tuple[type[arrays.BinaryArray], ...] = ((arrays.Int8Array,) * 3
                                                     + (arrays.Int4Array,) * 7)


def _run_columns(rows: Iterable[tuple[int, Sequence[Any]]]) -> list[arrays.BinaryArray]:
    """Run rows as the column arrays `_RUN_ARRAYS` takes."""
    columns = list(zip(*((run, *row) for run, row in rows), strict=True))
    if not columns:
        return []
    return [arrays.of_values(kind, column) for kind, column in zip(_RUN_FIELDS, columns,
                                                                   strict=True)]


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


def _patch_rows(patch: State) -> tuple[bytes, int]:
    """Binary COPY data of the devices a patch decides, (mask, token, columns) with KEEP
    columns holding NEW_DEVICE's value, and the number of rows. Read from the parts as
    the patch keeps them: most rows decide one part only."""
    registrations, deliveries = patch.registrations, patch.deliveries
    if not registrations and not deliveries:
        return b"", 0
    parts = [codec.COPY_SIGNATURE]
    header = codec.copy_row_header(2 + len(DEVICE_COLUMNS))
    text, int8, int4 = codec.copy_text, codec.copy_int8, codec.copy_int4
    run_and_attempts, finals = _RUN_AND_ATTEMPTS, _FINAL_FIELDS
    rows = 0
    for token, (run, attempts, next_at, apns_id, final) in deliveries.items():
        if token not in registrations:  # the common case in a run: delivery only
            rows += 1
            parts += (_DELIVERY_ROW, text(token), _NO_REGISTRATION,
                      run_and_attempts(8, run, 4, attempts), int8(next_at), text(apns_id),
                      finals[final])
    no_delivery = _UNSET_PARTS[True][1]
    for token, registration in registrations.items():
        rows += 1
        delivery = deliveries.get(token)
        if delivery is None and registration[1] is not KEEP:  # e.g. a new device
            active, registered, unregistered, cause = registration
            parts += (_REGISTRATION_ROW, text(token), codec.copy_bool(active), int8(registered),
                      int8(unregistered), text(cause), _NO_DELIVERY)
            continue
        row = registration + (delivery or no_delivery)
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
    return b"".join(parts), rows


# The array kind of each of DEVICE_COLUMNS (_DEVICE_TYPES).
_DEVICE_FIELDS: tuple[type[arrays.BinaryArray], ...] = (
    arrays.BoolArray, arrays.Int8Array, arrays.Int8Array, arrays.TextArray, arrays.Int8Array,
    arrays.Int4Array, arrays.Int8Array, arrays.TextArray, arrays.TextArray)


def _patch_groups(patch: State) -> tuple[dict[int, list[arrays.BinaryArray]], int]:
    """The rows of `_patch_rows` by mask: per mask, column arrays (token, then the
    columns the mask decides), as `_upsert_statement(mask)` takes them; and how many."""
    groups: dict[int, list[list[bytes]]] = {}
    kinds: dict[int, list[type[arrays.BinaryArray]]] = {}
    text, encode = codec.copy_text, arrays.FIELD
    devices = patch.devices
    for token, row in devices.items():
        mask = 0
        fields = [text(token)]
        for i, value in enumerate(row):
            if value is not KEEP:
                mask |= 1 << i
                fields.append(encode[_DEVICE_FIELDS[i]](value))
        columns = groups.get(mask)
        if columns is None:
            columns = groups[mask] = [[] for _ in fields]
            kinds[mask] = [arrays.TextArray, *[kind for i, kind in enumerate(_DEVICE_FIELDS)
                                                 if mask & (1 << i)]]
        for column, field in zip(columns, fields, strict=True):
            column.append(field)
    return {mask: [arrays.array(kind, column) for kind, column in zip(kinds[mask], columns,
                                                                      strict=True)]
            for mask, columns in groups.items()}, len(devices)


def write_runs(cur: psycopg.Cursor[Any], rows: Iterable[tuple[int, RunRow]]) -> None:
    """Upsert whole run rows."""
    columns = _run_columns(rows)
    if columns:
        cur.execute(_UPSERT_RUNS, columns)
