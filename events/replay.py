"""The replay engine: the event log folded from the start, and checked on the way.

The replay reads the log in pages by position, inside one REPEATABLE READ snapshot so
that the events, the head row and the cache tables it compares are one consistent
state even while the relay keeps appending. Verifying, it checks per event:
positions contiguous from 1; the body's own "position" and "type" and the `type`,
`token` and `run` columns agree with the bytes; `hash = sha256(previous || body)`.
At the end the last event must be the head recorded in `log_head` (a truncated tail
leaves the head pointing past the end), and the cache tables must equal the fold of
the log (events/projection.py). Long logs are replayed by worker processes, each
folding a slice of positions (`replay_parallel`).

Memory: one page of events plus the per-token fold (one small tuple per token); when
the tables are checked, also the `devices` table, read while worker processes replay.

Its users: `python -m relay audit` and `rebuild` (events/audit.py) and the HTML report
(events/report.py). One idea, a little past 500 lines: the sequential and the parallel
replay are the same fold over the same page reader and end in the same checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import json.scanner
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from events import codec, projection, shapes
from events.projection import DeviceRow, RunRow, State, time_ms
from relay.database import connect

# Events per keyset page. Small enough that a page, the one queued behind it and the fold's
# working set stay in the CPU caches (measured against larger pages with bench/replay.py:
# BENCHMARKS.md); the helper thread runs the extra queries meanwhile.
PAGE_SIZE = 2_000
PARALLEL_MIN_EVENTS = 200_000  # below this, worker processes cost more than they save
MIN_SLICE = 20_000  # events per slice at least: a worker process takes a while to start
PROGRESS_REFRESH = 0.2  # seconds between progress updates from worker processes
MAX_PROBLEMS = 20  # problems listed; the count goes on

_PAGE = ("SELECT type, token, run, body, hash, position FROM events"
         " WHERE position > %s AND position <= %s ORDER BY position LIMIT %s")


@dataclass
class Problem:
    position: int | None
    what: str


@dataclass
class Replay:
    """The outcome of folding (a prefix of) the log."""

    state: State = field(default_factory=State)
    events: int = 0
    last_position: int = 0
    last_hash: bytes = codec.GENESIS_HASH
    chain_problems: list[Problem] = field(default_factory=list)
    chain_problem_count: int = 0
    table_problems: list[Problem] = field(default_factory=list)
    table_problem_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def chain_problem(self, position: int | None, what: str) -> None:
        self.chain_problem_count += 1
        if len(self.chain_problems) < MAX_PROBLEMS:
            self.chain_problems.append(Problem(position, what))

    def table_problem(self, position: int | None, what: str) -> None:
        self.table_problem_count += 1
        if len(self.table_problems) < MAX_PROBLEMS:
            self.table_problems.append(Problem(position, what))

    @property
    def first_bad_position(self) -> int | None:
        """A broken chain outranks a stale cache: the tables follow from the log."""
        for problems in (self.chain_problems, self.table_problems):
            positions = [p.position for p in problems if p.position is not None]
            if positions:
                return min(positions)
        return None

    @property
    def verified(self) -> bool:
        return not self.chain_problem_count and not self.table_problem_count


def _pages(conn: psycopg.Connection[Any], first: int, last: int | None
           ) -> Iterator[list[tuple[Any, ...]]]:
    """Keyset pages of positions first..last in order, the next page fetched on a helper
    thread while the caller folds this one (the server works while Python does). The
    connection is the helper's until the generator is closed."""
    pages: queue.Queue[list[tuple[Any, ...]] | BaseException | None] = queue.Queue(maxsize=2)
    stop = threading.Event()
    bound = (1 << 62) if last is None else last

    def fetch() -> None:
        try:
            with conn.cursor() as cur:
                # Pages must come off the primary key in order. A log written since
                # autovacuum last analyzed it looks a thousand times smaller to the
                # planner, which then sorts half the table per page (slower than the whole
                # replay by index: BENCHMARKS.md); with sorting priced out it walks the index.
                cur.execute("SET LOCAL enable_sort = off")
                after = first - 1
                while not stop.is_set():
                    rows = cur.execute(_PAGE, (after, bound, PAGE_SIZE), binary=True).fetchall()
                    if not rows:
                        break
                    pages.put(rows)
                    after = rows[-1][-1]
                cur.execute("RESET enable_sort")
            pages.put(None)
        except BaseException as exc:  # handed to the consuming thread
            pages.put(exc)

    fetcher = threading.Thread(target=fetch, name="audit-fetch", daemon=True)
    fetcher.start()
    try:
        while (item := pages.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while fetcher.is_alive():  # unblock a fetcher waiting on a full queue
            with contextlib.suppress(queue.Empty):
                pages.get(timeout=0.05)
        fetcher.join()


# The C scanner behind json.loads, called directly: loads() adds encoding detection
# and whitespace handling that canonical bytes never need, and costs more for it.
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def _parse_beyond_orjson(body: bytes) -> Any:
    """What orjson refuses but JSON allows (integers beyond 64 bits), read by the
    standard scanner; None when the body is not one JSON value and nothing else."""
    try:
        text = body.decode()
        doc, end = _scan(text, 0)
    except (ValueError, StopIteration):
        return None
    return doc if end == len(text) else None


def _time_or_none(text: str) -> int:
    """Epoch ms of an event's "at"; a malformed one sorts before every --until."""
    try:
        return time_ms(text)
    except ValueError:
        return -1


def _disagreement(doc: dict[str, Any], position: int) -> str:
    if doc.get("position") != position:
        return f"event {position}: its body says position {doc.get('position')}: rows were moved"
    return f"event {position}: the type, token or run columns disagree with the body"


def replay_range(conn: psycopg.Connection[Any], result: Replay, *, first: int = 1,
                 last: int | None = None, verify: bool, until_ms: int | None = None,
                 token: str | None = None, progress: Any = None) -> bool:
    """Fold positions first..last into `result` (which holds the hash before `first`),
    checking them if asked. Returns False when stopped by `until_ms`.

    Positions must run on without a gap, and each body must name its own position, so a
    row deleted, moved or swapped shows at its place. The loop body runs once per event
    of the log: it is written for speed (orjson reads canonical bytes faster than the
    standard library; names are bound to locals; BENCHMARKS.md has the figures).
    """
    state_apply = result.state.apply
    history = result.history
    decoders = {type_: decoder.decode for type_, decoder in shapes.DECODERS.items()}
    decoder_of, invalid, encode = decoders.get, shapes.INVALID, shapes.ENCODE
    sha256 = hashlib.sha256
    loads, refused = orjson.loads, orjson.JSONDecodeError
    expected = first
    previous = result.last_hash
    count = 0
    complete = True
    for rows in _pages(conn, first, last):
        for type_, row_token, run, body, stored, row_position in rows:
            # Parsed by the type's validating decoder (events/shapes.py) when it can be;
            # else by orjson, or the standard parser (integers beyond 64 bits).
            decode = decoder_of(type_)
            valid = False
            if decode is not None:
                try:
                    doc = decode(body)
                    valid = True
                except invalid:
                    pass
            if not valid:
                try:
                    doc = loads(body)
                except refused:
                    doc = _parse_beyond_orjson(body)
                if type(doc) is not dict:
                    doc = None
            elif (until_ms is not None and isinstance(at := doc.get("at"), str)
                    and _time_or_none(at) > until_ms):
                complete = False
                break
            if verify:
                if row_position != expected:
                    result.chain_problem(expected, f"events {expected} to {row_position - 1}"
                                         " are missing")
                if sha256(previous + body).digest() != stored:
                    result.chain_problem(row_position, f"event {row_position}: hash does not match "
                                         "sha256(previous hash || body)")
                if doc is None:
                    result.chain_problem(row_position, f"event {row_position}: its body is not "
                                         "one JSON object")
                elif (doc.get("position") != row_position or doc.get("type") != type_
                        or doc.get("token") != row_token or doc.get("run") != run):
                    result.chain_problem(row_position, _disagreement(doc, row_position))
                elif not valid or encode(doc) != body:  # not certainly fine: decide exactly
                    doc = _parse_beyond_orjson(body) or doc  # orjson: huge integers as floats
                    if (bad := shapes.body_problem(doc, body)) is not None:
                        result.chain_problem(row_position, f"event {row_position}: {bad}")
                        doc = None  # not folded: the fold reads well-formed events only
            previous = stored
            expected = row_position + 1
            count += 1
            if doc is not None:
                try:
                    state_apply(type_, doc)
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                    result.chain_problem(row_position, f"event {row_position}: a {type_} that "
                                         f"cannot be read ({type(exc).__name__}: {exc})")
                if token is not None and row_token == token:
                    history.append(doc)
        else:
            if progress is not None:
                progress.update(len(rows))
            continue
        break
    if verify and complete and last is not None and expected <= last:
        result.chain_problem(expected, f"events {expected} to {last} are missing")
    result.events += count
    result.last_position, result.last_hash = expected - 1, previous
    return complete


def replay(conn: psycopg.Connection[Any], *, verify: bool, until_ms: int | None = None,
           token: str | None = None, progress: Any = None) -> Replay:
    """Fold the whole log (or up to the first event stamped after `until_ms`)."""
    result = Replay()
    replay_range(conn, result, verify=verify, until_ms=until_ms, token=token,
                 progress=progress)
    return result


# --- in parallel: slices of positions folded by several processes ----------------------
# This process folds the first slice on its own connection while worker processes fold
# the others, each reading its slice in the same snapshot (pg_export_snapshot), checking
# its part of the chain from the stored hash before the slice (the slice before checks
# that hash; each row's link needs only the stored hash before it), and folding it into
# a patch (projection.State(patch=True)); patches are merged in order. One slice per
# process: every slice of a long log touches most tokens, so each extra slice costs a
# merge and a transfer of that many rows; and the first slice needs neither a process
# start-up nor a transfer of its rows. Processes, not threads:
# the work is Python, held by the GIL.


@dataclass
class _Slice:
    dsn: str
    snapshot: str
    first: int
    last: int
    verify: bool
    until_ms: int | None
    token: str | None


class _SharedProgress:
    """`progress.update` inside a worker: adds to a counter the parent shows."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    def update(self, events: int) -> None:
        with self._counter.get_lock():
            self._counter.value += events


class _ProgressWithWorkers:
    """`progress.update` in this process: shows its own events and the workers' so far."""

    def __init__(self, progress: Any, counter: Any) -> None:
        self._progress, self._counter, self._shown = progress, counter, 0

    def update(self, events: int) -> None:
        workers = self._counter.value
        self._progress.update(events + workers - self._shown)
        self._shown = workers


_worker_progress: _SharedProgress | None = None


def _start_worker(counter: Any) -> None:
    global _worker_progress
    _worker_progress = _SharedProgress(counter)


def _replay_slice(job: _Slice) -> tuple[Replay, bool]:
    with connect(job.dsn, application_name="relay-audit-worker") as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(job.snapshot)))
        result = Replay(state=State(patch=job.first > 1))
        if job.first > 1:
            # The last row before the slice, as a replay from the start would have it
            # (if rows are missing there, the previous slice reports them).
            row = conn.execute("SELECT hash FROM events WHERE position < %s"
                               " ORDER BY position DESC LIMIT 1", (job.first,),
                               binary=True).fetchone()
            if row is not None:
                result.last_hash = row[0]
        complete = replay_range(conn, result, first=job.first, last=job.last,
                                verify=job.verify, until_ms=job.until_ms, token=job.token,
                                progress=_worker_progress)
        return result, complete


def workers_can_start() -> bool:
    """Spawned workers re-import the main module: impossible from a script on stdin."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path)


def replay_parallel(conn: psycopg.Connection[Any], dsn: str, jobs: int, *, verify: bool,
                    until_ms: int | None = None, token: str | None = None,
                    progress: Any = None, meanwhile: Callable[[], None] | None = None
                    ) -> Replay:
    """`replay` in `jobs` slices, the first folded here on `conn` (which must be in the
    snapshot to share), the others by worker processes. `meanwhile` runs here after the
    first slice, while the workers may still be replaying."""
    row = conn.execute("SELECT pg_export_snapshot(), (SELECT max(position) FROM events)"
                       ).fetchone()
    assert row is not None
    snapshot, end = row[0], row[1] or 0
    size = max(MIN_SLICE, -(-end // jobs))
    slices = [_Slice(dsn, snapshot, first, min(first + size - 1, end), verify, until_ms, token)
              for first in range(1, end + 1, size)]
    if len(slices) < 2:
        result = replay(conn, verify=verify, until_ms=until_ms, token=token, progress=progress)
        if meanwhile is not None:
            meanwhile()
        return result
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    shown = None if progress is None else _ProgressWithWorkers(progress, counter)
    result = Replay()
    with context.Pool(len(slices) - 1, _start_worker, (counter,)) as pool:
        parts = pool.imap(_replay_slice, slices[1:])
        complete = replay_range(conn, result, last=slices[0].last, verify=verify,
                                until_ms=until_ms, token=token, progress=shown)
        if complete and meanwhile is not None:
            meanwhile()
        for _ in slices[1:] if complete else ():
            while True:
                try:
                    part, complete = parts.next(None if shown is None else PROGRESS_REFRESH)
                    break
                except multiprocessing.TimeoutError:
                    assert shown is not None
                    shown.update(0)
            result.state.merge(part.state)
            for problem in part.chain_problems:
                result.chain_problem(problem.position, problem.what)
            result.chain_problem_count += part.chain_problem_count - len(part.chain_problems)
            result.history += part.history
            result.events += part.events
            if part.events:
                result.last_position, result.last_hash = part.last_position, part.last_hash
            if not complete:
                break
        pool.terminate()
        if shown is not None:
            shown.update(0)
    return result


def check_head(cur: psycopg.Cursor[Any], result: Replay) -> None:
    """The last event must be the head: catches a truncated tail (and events past it)."""
    row = cur.execute("SELECT position, hash FROM log_head").fetchone()
    if row is None:
        result.chain_problem(None, "log_head has no row")
        return
    head_position, head_hash = row[0], bytes(row[1])
    if head_position > result.last_position:
        result.chain_problem(result.last_position + 1,
                             f"the log ends at {result.last_position} but its head is at "
                             f"{head_position}: events were removed from the tail")
    elif head_position < result.last_position:
        result.chain_problem(head_position + 1,
                             f"events after the head ({head_position}) up to "
                             f"{result.last_position} were added behind the Journal's back")
    elif head_hash != result.last_hash:
        result.chain_problem(head_position, f"the head's hash differs from event "
                             f"{head_position}'s")


def device_rows(cur: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
    """Every row of the devices cache, for `check_tables`."""
    return cur.execute(f"SELECT token, {', '.join(projection.DEVICE_COLUMNS)} FROM devices",
                       binary=True).fetchall()


def check_tables(cur: psycopg.Cursor[Any], result: Replay,
                 devices_table: Iterable[tuple[Any, ...]]) -> None:
    """The cache tables must equal the fold; each difference names the last event that
    decided the row. `devices_table` is `device_rows` read in the replay's snapshot.
    Consumes the fold's devices (rows are dropped once compared)."""
    devices = result.state.devices
    differences: list[tuple[str, Any, str]] = []  # (column to look up, value, problem)
    for token, *values in devices_table:
        expected: DeviceRow | None = devices.pop(token, None)
        if expected is None:
            differences.append(("token", token, f"devices has a row for {token} "
                                "that the log never made"))
        elif tuple(values) != expected:
            differences.append(("token", token, f"devices row for {token} is "
                                f"{_named(values)}, the log says {_named(expected)}"))
    differences += [("token", token, f"devices lacks the row for {token}")
                    for token in devices]
    devices.clear()
    runs = dict(result.state.runs)
    for number, *values in cur.execute(
            f"SELECT run, {', '.join(projection.RUN_COLUMNS)} FROM runs").fetchall():
        expected_run: RunRow | None = runs.pop(number, None)
        if tuple(values) != expected_run:
            differences.append(("run", number, f"runs row for run {number} is "
                                f"{tuple(values)}, the log says {expected_run}"))
    differences += [("run", number, f"runs lacks the row for run {number}") for number in runs]
    last = _last_positions(cur, [value for column, value, _ in differences[:MAX_PROBLEMS]
                                 if column == "token"],
                           [value for column, value, _ in differences[:MAX_PROBLEMS]
                            if column == "run"])
    for column, value, what in differences:
        result.table_problem(last.get((column, value)), what)


def _last_positions(cur: psycopg.Cursor[Any], tokens: list[str],
                    runs: list[int]) -> dict[tuple[str, Any], int]:
    """The last event mentioning each token and run: one scan of the log."""
    if not tokens and not runs:
        return {}
    found: dict[tuple[str, Any], int] = {}
    for token, run, position in cur.execute(
            "SELECT token, run, max(position) FROM events"
            " WHERE token = ANY(%s) OR run = ANY(%s) GROUP BY GROUPING SETS ((token), (run))",
            (tokens, runs)):
        if token in tokens:
            found["token", token] = position
        if run in runs:
            found["run", run] = position
    return found


def _named(values: Any) -> str:
    return "{" + ", ".join(f"{c}={v!r}" for c, v in zip(projection.DEVICE_COLUMNS, values,
                                                         strict=True)) + "}"


def read_only_snapshot(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def event_count(cur: psycopg.Cursor[Any]) -> int:
    row = cur.execute("SELECT position FROM log_head").fetchone()
    return int(row[0]) if row else 0


def check_prefix_against_head(cur: psycopg.Cursor[Any], result: Replay) -> None:
    """With --until only a prefix is checked; the head must at least not be before it."""
    row = cur.execute("SELECT position FROM log_head").fetchone()
    if row is not None and row[0] < result.last_position:
        result.chain_problem(row[0] + 1, f"events after the head ({row[0]}) were added "
                             "behind the Journal's back")


def token_replay(cur: psycopg.Cursor[Any], token: str, until_ms: int | None) -> Replay:
    """One token's events through the index; its state depends on them alone."""
    result = Replay()
    for position, body in cur.execute(
            "SELECT position, body FROM events WHERE token = %s ORDER BY position", (token,),
            binary=True):
        try:
            doc = codec.decode(body)
        except ValueError:
            result.chain_problem(position, f"event {position}: its body is not one JSON object")
            continue
        if until_ms is not None and _time_or_none(str(doc.get("at"))) > until_ms:
            break
        if (bad := shapes.problem(doc)) is not None:
            result.chain_problem(position, f"event {position}: {bad}")
        else:
            result.state.apply(doc["type"], doc)
        result.history.append(doc)
        result.events += 1
        result.last_position = position
    return result
