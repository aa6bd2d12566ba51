"""Several relay processes on one PostgreSQL: token shards, their leases, and each run
started and finished once for the whole cluster.

Shards. A token's point is the first 16 bits of md5(token) (the database computes the
same, `token_point` in schema/006_cluster.sql, and indexes active tokens by it); shard i
of N holds the points from ceil(i * 65536 / N) up to ceil((i + 1) * 65536 / N). A run's
tokens are driven shard by shard, each shard by the one process holding its lease.

Leases. Every process keeps a `LeaseKeeper`: a thread that every `lease_ttl / 3`
renews its member row and its leases, and takes free or expired shards up to its fair
share (the shards divided by the live members, rounded up) with `FOR UPDATE SKIP
LOCKED`, so processes never wait on each other's choices. Taking a shard raises its
epoch and appends `shard_leased` in the same transaction, under the log's head lock:
outcomes appended before are visible to the new holder, and outcomes appended after are
checked against the new epoch (fencing, events/journal.py). The take is a transaction
of its own, after the renewal, and waits for the head lock briefly: a process paused
while holding that lock (its transaction ended by the server after
`cluster.hold_limit`, or, paused between the messages of one write, where the server times
nothing, its session ended after as long by the process whose take found the lock held)
delays a take, never the renewal. A process holding more than
its share marks the excess as draining: its Dispatcher stops taking their tokens and
releases each (`shard_released`) once its sends are answered. A process that cannot
renew sends nothing more for its shards once the lease it last renewed runs out by its
own clock, which it started before the renewal was sent (so before the database's);
the next renewal says which shards are still its own (same epoch: it carries on) and
which were taken over (dropped).

Runs. `ClusterLog.start_or_join` and `ClusterLog.finish` decide under the head lock, so
two processes finding a run due at the same moment start one run, and a run finishes
exactly once: when no active token is left without a final outcome in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from events import projection
from events import types as ev
from events.batch_sql import append_locked, end_stalled_head_holder, lock_head
from events.store import RunRecord
from relay import metrics
from relay.config import ClusterConfig
from relay.database import connect, first_line, idle_transaction_limit

log = logging.getLogger(__name__)

POINTS = 1 << 16  # token points: 16 bits of md5(token)
RENEWALS_PER_TTL = 3  # a lease is renewed this many times within its lifetime
WHY_STOPPING, WHY_REBALANCING = "stopping", "rebalancing"


def token_point(token: str) -> int:
    """The token's point in 0..65535, as `token_point` in SQL computes it."""
    return int.from_bytes(hashlib.md5(token.encode("ascii"), usedforsecurity=False).digest()[:2],
                          "big")


def shard_bounds(shard: int, shards: int) -> tuple[int, int]:
    """The points [low, high) of `shard` of `shards`."""
    return -(-shard * POINTS // shards), -(-(shard + 1) * POINTS // shards)


def shard_of(token: str, shards: int) -> int:
    return token_point(token) * shards // POINTS


@dataclass(frozen=True)
class Member:
    """This process, as the cluster names it: host, pid and a random suffix (pids repeat)."""

    process: str
    host: str
    pid: int

    @classmethod
    def of_this_process(cls) -> Member:
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host}:{pid}:{secrets.token_hex(3)}", host, pid)


@dataclass(frozen=True)
class Leases:
    """What this process holds: shard -> epoch, and those to give up once drained.
    `valid` False: the last renewal has run out by this process's clock, so nothing may be
    sent for them until a renewal says which are still ours."""

    held: Mapping[int, int] = field(default_factory=dict)
    draining: frozenset[int] = frozenset()
    valid: bool = True


class LeaseKeeper:
    """This process's leases on shards (see the module docstring); thread-safe."""

    def __init__(self, dsn: str, config: ClusterConfig, member: Member | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dsn, self._config, self._clock = dsn, config, clock
        self.member = member or Member.of_this_process()
        self._db = threading.Lock()  # one connection, one caller at a time
        self._conn: psycopg.Connection[Any] | None = None
        self._state = threading.Lock()
        self._held: dict[int, int] = {}
        self._draining: frozenset[int] = frozenset()
        self._valid_until = 0.0
        self._leases = Leases()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.driving = False  # a Dispatcher releases draining shards itself, once drained
        self._failed = False

    @property
    def shards(self) -> int:
        return self._config.shards

    @property
    def renew_every(self) -> float:
        return self._config.lease_ttl / RENEWALS_PER_TTL

    @property
    def round_timeout(self) -> float:
        """A round of statements unanswered this long is abandoned."""
        return self._config.hold_limit

    @property
    def take_wait(self) -> float:
        """How long taking shards may wait for the head lock (held by an appender, or by
        a paused process until the server ends its transaction): the next renewal must
        not be late for it."""
        return self.renew_every / 2

    def start(self) -> None:
        """Join the cluster and take a first share; then keep renewing in a thread."""
        self.renew()
        self._thread = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)
        self._thread.start()

    def leases(self) -> Leases:
        """The shards this process holds (not `valid` once its last renewal ran out)."""
        with self._state:
            if self._clock() >= self._valid_until:
                return Leases(self._leases.held, self._leases.draining, valid=False)
            return self._leases

    def _keep(self) -> None:
        while not self._stopping.wait(self.renew_every):
            self.renew()

    def renew(self) -> None:
        """One round: renew what is held, learn what was lost, take up to the fair share.

        A round unanswered within a renewal period is abandoned (its connection's socket
        shut down): a silent network path must not hold the keeper, or its stop, forever."""
        sent = self._clock()
        try:
            with self._guarded():
                held, draining, taken = self._round()
        except psycopg.Error as exc:
            self._drop_connection()
            if not self._failed:
                log.warning("cannot renew the shard leases (%s); they lapse %.1fs after the "
                            "last renewal", first_line(exc), self._config.lease_ttl)
            self._failed = True
            return
        if self._failed:
            log.info("shard leases renewed again")
        self._failed = False
        with self._state:
            lost = sorted(s for s, e in self._held.items() if held.get(s) != e)
            self._held, self._draining = held, draining
            self._valid_until = sent + self._config.lease_ttl
            self._leases = Leases(dict(held), draining)
        if lost:
            metrics.LEASE_CHANGES.labels("lost").inc(len(lost))
            log.warning("lost the lease on shard(s) %s to other processes", lost)
        if taken:
            metrics.LEASE_CHANGES.labels("taken").inc(len(taken))
            log.info("leased shard(s) %s", sorted(taken))
        metrics.SHARDS_HELD.set(len(held))
        if draining and not self.driving:
            self.release(draining, WHY_REBALANCING)

    def _round(self) -> tuple[dict[int, int], frozenset[int], list[int]]:
        """Renew, then take in a transaction of its own: a take waiting on the head lock
        (another process paused holding it) must never cost this process its leases."""
        conn = self._connection()
        me, ttl, shards = self.member, self._config.lease_ttl, self._config.shards
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("INSERT INTO cluster_members (process, host, pid) VALUES (%s, %s, %s)"
                        " ON CONFLICT (process) DO UPDATE SET seen_at = now()",
                        (me.process, me.host, me.pid))
            held = dict(cur.execute(
                "UPDATE cluster_shards SET expires_at = now() + make_interval(secs => %s)"
                " WHERE holder = %s AND shard < %s RETURNING shard, epoch",
                (ttl, me.process, shards)).fetchall())
            row = cur.execute("SELECT count(*) FROM cluster_members"
                              " WHERE seen_at > now() - make_interval(secs => %s)",
                              (ttl,)).fetchone()
            share = math.ceil(shards / max(1, int(row[0]) if row else 1))
        taken: list[int] = []
        if len(held) < share:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT set_config('lock_timeout', %s, true)",
                                (f"{max(1, round(self.take_wait * 1000))}ms",))
                    taken = self._take(cur, share - len(held), held)
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                log.info("the log's head stayed locked for %.1fs: free shards are taken at a "
                         "later renewal", self.take_wait)
                self._end_stalled_holder(conn)
        excess = sorted(held, reverse=True)[:max(0, len(held) - share)]
        return held, frozenset(excess), taken

    def _end_stalled_holder(self, conn: psycopg.Connection[Any]) -> None:
        """A process paused in the middle of a write holds the head lock where the server's
        `hold_limit` does not reach (see `end_stalled_head_holder`): every process would
        wait on it for as long as it stays paused. The first to find it so ends its session."""
        try:
            with conn.transaction(), conn.cursor() as cur:
                ended = end_stalled_head_holder(cur, self._config.hold_limit)
        except psycopg.Error as exc:  # never at the cost of the renewal already made
            log.warning("cannot tell who holds the log's head lock: %s", first_line(exc))
            return
        if ended is not None:
            pid, name, waited = ended
            metrics.HEAD_HOLDERS_ENDED.inc()
            log.warning("ended the database session %d (%s): it held the log's head lock and "
                        "had waited %.1fs for its process to send the rest of a write (a "
                        "paused or stuck process); that process settles the write when it "
                        "runs again", pid, name, waited)

    def _take(self, cur: psycopg.Cursor[Any], wanted: int, held: dict[int, int]) -> list[int]:
        me, ttl = self.member, self._config.lease_ttl
        free = cur.execute(
            "SELECT shard, holder FROM cluster_shards"
            " WHERE shard < %s AND (holder IS NULL OR expires_at < now())"
            " ORDER BY shard LIMIT %s FOR UPDATE SKIP LOCKED",
            (self._config.shards, wanted)).fetchall()
        if not free:
            return []
        head = lock_head(cur)  # after the rows: appenders never lock shard rows
        previous = dict(free)
        rows = cur.execute(
            "UPDATE cluster_shards SET holder = %s, host = %s, epoch = epoch + 1,"
            " leased_at = now(), expires_at = now() + make_interval(secs => %s)"
            " WHERE shard = ANY(%s) RETURNING shard, epoch",
            (me.process, me.host, ttl, list(previous))).fetchall()
        now = ev.now_ms()
        append_locked(cur, [ev.shard_leased(now, process=me.process, host=me.host, shard=s,
                                            epoch=e, took_from=previous[s])
                            for s, e in sorted(rows)], head)
        held.update(rows)
        return [s for s, _ in rows]

    def release(self, shards: Iterable[int], why: str) -> None:
        """Give `shards` up at once (their sends are answered): `shard_released` each."""
        with self._state:
            mine = {s: self._held[s] for s in shards if s in self._held}
        if not mine:
            return
        me = self.member
        try:
            with self._guarded():
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    rows = cur.execute(
                        "SELECT shard, epoch FROM cluster_shards WHERE holder = %s"
                        " AND shard = ANY(%s) FOR UPDATE", (me.process, list(mine))).fetchall()
                    ours = [(s, e) for s, e in rows if mine.get(s) == e]
                    if ours:
                        head = lock_head(cur)
                        cur.execute("UPDATE cluster_shards SET holder = NULL, host = NULL,"
                                    " expires_at = NULL WHERE shard = ANY(%s)",
                                    ([s for s, _ in ours],))
                        now = ev.now_ms()
                        append_locked(cur, [ev.shard_released(
                            now, process=me.process, host=me.host, shard=s, epoch=e, why=why)
                            for s, e in sorted(ours)], head)
        except psycopg.Error as exc:
            self._drop_connection()
            log.warning("cannot release shard(s) %s (%s); they lapse within %.1fs",
                        sorted(mine), first_line(exc), self._config.lease_ttl)
            return
        with self._state:
            for shard in mine:
                self._held.pop(shard, None)
            self._draining = self._draining - set(mine)
            self._leases = Leases(dict(self._held), self._draining)
        metrics.LEASE_CHANGES.labels("released").inc(len(mine))
        metrics.SHARDS_HELD.set(len(self._held))
        log.info("released shard(s) %s (%s)", sorted(mine), why)

    def stop(self) -> None:
        """Release every shard and leave the cluster (after the run has drained)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.renew_every + self.round_timeout)
        with self._state:
            held = list(self._held)
        self.release(held, WHY_STOPPING)
        with contextlib.suppress(psycopg.Error), self._guarded():
            conn = self._connection()
            conn.execute("DELETE FROM cluster_members WHERE process = %s",
                         (self.member.process,))
            conn.commit()
        self._drop_connection()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # No statement may outlast a round: a blocked one is a failed renewal, and the
            # leases lapse by this process's clock meanwhile.
            timeout_ms = max(100, round(self.round_timeout * 1000))
            self._conn = connect(
                self._dsn, application_name="relay-leases",
                options=f"-c statement_timeout={timeout_ms} "
                        + idle_transaction_limit(self._config.hold_limit))
            projection.prepare(self._conn)
            self._conn.commit()
            self._conn.execute(
                "INSERT INTO cluster_shards (shard) SELECT generate_series(0, %s - 1)"
                " ON CONFLICT (shard) DO NOTHING", (self._config.shards,))
            self._conn.commit()
        return self._conn

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """The connection, for one round of statements answered within a renewal period."""
        with self._db:
            watchdog = threading.Timer(self.round_timeout, self._abandon_round)
            watchdog.daemon = True
            watchdog.start()
            try:
                yield
            finally:
                watchdog.cancel()

    def _abandon_round(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        log.warning("a lease renewal went unanswered for %.1fs: dropping its connection",
                    self.round_timeout)
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


@dataclass(frozen=True)
class Finish:
    """What `ClusterLog.finish` found: the run finished now (by us), earlier (by
    another process), or not yet (tokens without a final outcome remain)."""

    finished: bool
    by_us: bool = False
    record: RunRecord | None = None


class ClusterLog:
    """The decisions every process may take and exactly one must: start a run, finish it.
    One connection, kept (a broken one is dropped and made again at the next call); its
    transactions take the head lock, so the server ends one idle `hold_limit` seconds."""

    def __init__(self, dsn: str, hold_limit: float = ClusterConfig().hold_limit) -> None:
        self._dsn, self._hold_limit = dsn, hold_limit
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def start_or_join(self, interval: float, *, force: bool,
                      apns: Mapping[str, str | None] | None = None
                      ) -> tuple[RunRecord | None, bool]:
        """The unfinished run (to join), else a new run if one is due (`interval` after
        the last one started, by the log) or `force`d: (record, started by us); else
        (None, False)."""
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT run, started_at_ms, tokens, delivered, failed, abandoned, dead,"
                " unregistered, kept, finished_at_ms FROM runs"
                " WHERE started_at_ms IS NOT NULL ORDER BY run DESC LIMIT 1").fetchone()
            if row is not None and row[9] is None:
                return RunRecord(*row[:9]), False
            now = ev.now_ms()
            if row is not None and not force and row[1] + interval * 1000 > now:
                return None, False
            head = lock_head(cur)
            # Decided again under the lock: another process may have started one meanwhile.
            row = cur.execute("SELECT run, finished_at_ms FROM runs"
                              " WHERE started_at_ms IS NOT NULL"
                              " ORDER BY run DESC LIMIT 1").fetchone()
            if row is not None and row[1] is None:
                return self._record(cur, int(row[0])), False
            last = cur.execute("SELECT coalesce(max(run), 0) FROM runs").fetchone()
            count = cur.execute("SELECT count(*) FROM devices WHERE active").fetchone()
            assert last is not None and count is not None
            run, tokens = int(last[0]) + 1, int(count[0])
            append_locked(cur, [ev.run_started(run, now, tokens, apns=apns)], head)
            return RunRecord(run, now, tokens, 0, 0, 0, 0, 0, 0), True

    def next_due(self, interval: float) -> float:
        """Seconds until a run is due (0: now, or one is unfinished)."""
        with self._transaction() as cur:
            row = cur.execute("SELECT started_at_ms, finished_at_ms FROM runs"
                              " WHERE started_at_ms IS NOT NULL"
                              " ORDER BY run DESC LIMIT 1").fetchone()
        if row is None or row[1] is None:
            return 0.0
        return max(0.0, (int(row[0]) + interval * 1000 - ev.now_ms()) / 1000)

    def finish(self, run: int) -> Finish:
        """Append `run_finished` if every active token has a final outcome in `run` and no
        process did already; its counts are the run's as the log holds them."""
        with self._transaction() as cur:
            record = self._record(cur, run)
            if self._finished(cur, run):
                return Finish(True, record=record)
            if self._pending(cur, run):
                return Finish(False, record=record)
            head = lock_head(cur)
            if self._finished(cur, run):
                return Finish(True, record=record)
            if self._pending(cur, run):  # a registration may have committed meanwhile
                return Finish(False, record=record)
            record = self._record(cur, run)
            assert record is not None
            done = record.delivered + record.abandoned + record.dead
            append_locked(cur, [ev.run_finished(
                run, ev.now_ms(), tokens=done, delivered=record.delivered,
                failed=record.failed, abandoned=record.abandoned, dead=record.dead,
                unregistered=record.unregistered, kept=record.kept)], head)
            return Finish(True, by_us=True, record=RunRecord(
                run, record.started_at_ms, done, record.delivered, record.failed,
                record.abandoned, record.dead, record.unregistered, record.kept))

    @staticmethod
    def _record(cur: psycopg.Cursor[Any], run: int) -> RunRecord | None:
        row = cur.execute("SELECT run, started_at_ms, tokens, delivered, failed, abandoned,"
                          " dead, unregistered, kept FROM runs WHERE run = %s",
                          (run,)).fetchone()
        return None if row is None else RunRecord(*row)

    @staticmethod
    def _finished(cur: psycopg.Cursor[Any], run: int) -> bool:
        row = cur.execute("SELECT finished_at_ms IS NOT NULL FROM runs WHERE run = %s",
                          (run,)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _pending(cur: psycopg.Cursor[Any], run: int) -> bool:
        row = cur.execute("SELECT EXISTS (SELECT 1 FROM devices WHERE active"
                          " AND (run IS DISTINCT FROM %s OR final IS NULL))",
                          (run,)).fetchone()
        return bool(row and row[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._dsn, application_name="relay-cluster",
                                     options=idle_transaction_limit(self._hold_limit))
                projection.prepare(self._conn)
                self._conn.commit()
            try:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None
                raise


class ClusterView:
    """`GET /cluster`'s reader: one short connection per call (an operator's endpoint)."""

    def __init__(self, dsn: str, ttl: float) -> None:
        self._dsn, self._ttl = dsn, ttl

    def __call__(self) -> dict[str, Any]:
        with connect(self._dsn, application_name="relay-cluster-view") as conn:
            return cluster_view(conn, self._ttl)


def cluster_view(conn: psycopg.Connection[Any], ttl: float) -> dict[str, Any]:
    """For `GET /cluster`: the live processes, their shards and the age of each lease."""
    members = conn.execute(
        "SELECT process, host, pid, extract(epoch FROM now() - started_at),"
        " extract(epoch FROM now() - seen_at) FROM cluster_members"
        " WHERE seen_at > now() - make_interval(secs => %s) ORDER BY process",
        (ttl,)).fetchall()
    leases = conn.execute(
        "SELECT holder, shard, epoch, extract(epoch FROM now() - leased_at),"
        " extract(epoch FROM expires_at - now()) FROM cluster_shards"
        " WHERE holder IS NOT NULL ORDER BY shard").fetchall()
    shards: dict[str, list[dict[str, Any]]] = {}
    for holder, shard, epoch, age, left in leases:
        shards.setdefault(holder, []).append({
            "shard": shard, "epoch": epoch, "lease_age_s": round(float(age), 3),
            "expires_in_s": round(float(left), 3)})
    return {"processes": [
        {"process": process, "host": host, "pid": pid, "up_s": round(float(up), 3),
         "seen_s_ago": round(float(seen), 3), "shards": shards.get(process, [])}
        for process, host, pid, up, seen in members]}
