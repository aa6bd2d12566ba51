"""Appends per second through the Journal (group commit), next to the raw COPY rate.

    python -m bench.journal [--dsn SUPERUSER_DSN] [--events 200000] [--appenders 16]
    python -m bench.journal --lone 3000      # one registration at a time, against naive

Works in a scratch database it creates and drops (DSN from --dsn, else
$RELAY_BENCH_DSN or $RELAY_TEST_DSN, else a private throwaway cluster). The workload
is a wakeup's: registrations, then one run (run_started, one outcome per token, a few
failures and retries). Appenders are threads appending small groups of events, as the
actors do; the figure counts from the first append to the last acknowledgement.

The raw COPY rate is the same rows (canonical bytes and hashes precomputed) copied
into a trigger-less copy of the events table with its indexes, in transactions of
the Journal's batch size: what the server can take without the chain check, the
projections and Python's per-event work.

`--lone N` measures what one client alone waits for: N registrations one after the
other through the Journal (each its own commit: the writer is idle when it arrives),
against the naive endpoint's write of the same registration (bench/peers/
naive_registrations.py: INSERT ... ON CONFLICT, then COMMIT) on the same server, in
alternating slices. It prints the median latency and the CPU of this process per
registration for each (PostgreSQL's not counted), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench.peers import naive_registrations
from events import codec
from events import types as ev
from events.journal import MAX_BATCH, Journal
from relay.database import EmbeddedPostgres, apply_migrations, scratch_database, with_dbname
from relay.supervisor import freeze_startup_heap

T0 = 1_760_000_000_000


@contextmanager
def server(dsn: str | None) -> Iterator[str]:
    dsn = dsn or os.environ.get("RELAY_BENCH_DSN") or os.environ.get("RELAY_TEST_DSN")
    if dsn:
        yield dsn
        return
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    directory.chmod(0o755)
    embedded = EmbeddedPostgres(directory)
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def migrated_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """A fresh database with the migrations applied (its DSN), dropped afterwards."""
    with scratch_database(admin_dsn, prefix) as name:
        dsn = with_dbname(admin_dsn, name)
        apply_migrations(dsn)
        yield dsn


def wakeup_workload(count: int, seed: int = 7) -> list[ev.Event]:
    """About `count` events: registrations (in arrival order, random), then a run with a
    few retries, sending in token order as the Dispatcher pages through the devices."""
    rng = random.Random(seed)
    tokens = [f"{rng.getrandbits(256):064x}" for _ in range(max(1, count // 2 - 2))]
    events = [ev.device_registered(t, T0 + i) for i, t in enumerate(tokens)]
    events.append(ev.run_started(1, T0 + 10_000_000, len(tokens)))
    at = T0 + 10_000_001
    for token in sorted(tokens):
        if len(events) >= count - 1:
            break
        at += 1
        if rng.random() < 0.03:
            events.append(ev.notification_failed(
                1, token, at, attempt=1, apns_id=str(uuid.UUID(int=rng.getrandbits(128))),
                status=503, reason="ServiceUnavailable", verdict="transient",
                apple_timestamp_ms=None, latency_ms=rng.uniform(5, 80),
                next_attempt_at_ms=at + 900_000))
        else:
            events.append(ev.notification_delivered(
                1, token, at, attempt=1, apns_id=str(uuid.UUID(int=rng.getrandbits(128))),
                status=200, latency_ms=rng.uniform(5, 80)))
    events.append(ev.run_finished(1, at + 1, tokens=len(tokens), delivered=0, failed=0,
                                  abandoned=0, dead=0, unregistered=0, kept=0))
    return events[:count]


def journal_rate(dsn: str, events: list[ev.Event], appenders: int, group: int,
                 max_batch: int, max_delay: float) -> tuple[float, int]:
    """Events per second through one Journal; also the number of transactions."""
    journal = Journal(dsn, max_batch=max_batch, max_delay=max_delay)
    journal.start()
    futures: list[list[Future[list[int]]]] = [[] for _ in range(appenders)]
    # Registrations first (the run needs them), each appender a slice, in order.
    slices = [events[i:i + group] for i in range(0, len(events), group)]

    def append(k: int) -> None:
        for chunk in slices[k::appenders]:
            futures[k].append(journal.append(chunk))

    # The relay freezes its start-up heap; here that includes the prepared workload, which
    # the relay never holds: otherwise every full collection would walk all of it.
    freeze_startup_heap()
    start = time.perf_counter()
    threads = [threading.Thread(target=append, args=(k,)) for k in range(appenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for own in futures:
        for future in own:
            future.result(600)
    elapsed = time.perf_counter() - start
    journal.stop(10)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM journal_batches").fetchone()
    return len(events) / elapsed, int(row[0]) if row else 0


def raw_copy_rate(dsn: str, events: list[ev.Event], batch: int) -> tuple[float, float]:
    """Rows per second COPYing the same rows without triggers or projections:
    (in transactions of `batch` rows, in one transaction)."""
    rows = []
    previous = codec.GENESIS_HASH
    for position, event in enumerate(events, 1):
        body = codec.canonical_bytes(position, event.type, event.data)
        previous = codec.chain_hash(previous, body)
        rows.append(codec.copy_row_header(6) + codec.copy_int8(position)
                    + codec.copy_text(event.type) + codec.copy_text(event.data.get("token"))
                    + codec.copy_int8(event.data.get("run")) + codec.copy_bytes(body)
                    + codec.copy_bytes(previous))
    rates = []
    for size in (batch, len(rows)):
        with psycopg.connect(dsn) as conn:
            conn.execute("DROP TABLE IF EXISTS raw_events")
            conn.execute("CREATE TABLE raw_events (LIKE events INCLUDING ALL)")
            conn.commit()
            start = time.perf_counter()
            for i in range(0, len(rows), size):
                with conn.cursor() as cur, cur.copy("COPY raw_events FROM STDIN (FORMAT BINARY)") \
                        as copy:
                    copy.write(b"".join([codec.COPY_SIGNATURE, *rows[i:i + size],
                                         codec.COPY_TRAILER]))
                conn.commit()
            rates.append(len(rows) / (time.perf_counter() - start))
    return rates[0], rates[1]


LONE_SLICES = 6  # alternating slices per side


def lone_latencies(dsn: str, count: int) -> dict[str, tuple[list[float], float]]:
    """Per side ("journal", "naive"): `count` sequential registrations' latencies (s),
    and this process's CPU seconds over them."""
    figures: dict[str, tuple[list[float], float]] = {"journal": ([], 0.0), "naive": ([], 0.0)}
    journal = Journal(dsn)
    journal.start()
    naive = psycopg.connect(dsn)
    naive.execute(naive_registrations.SCHEMA)
    naive.commit()

    def through_journal(i: int) -> None:
        journal.append([ev.device_registered(f"{i:064x}", T0 + i)]).result(10)

    def naive_write(i: int) -> None:
        naive.execute(naive_registrations.UPSERT, (f"{i:064x}", T0 + i))
        naive.commit()

    try:
        for i in range(200):  # warm-up: connections, prepared statements, caches
            through_journal(count + i)
            naive_write(count + i)
        per_slice = max(1, count // LONE_SLICES)
        for start in range(0, count, per_slice):
            for side, write in (("journal", through_journal), ("naive", naive_write)):
                latencies, cpu = figures[side]
                cpu_before = time.process_time()
                for i in range(start, min(count, start + per_slice)):
                    began = time.perf_counter()
                    write(i)
                    latencies.append(time.perf_counter() - began)
                figures[side] = (latencies, cpu + time.process_time() - cpu_before)
    finally:
        naive.close()
        journal.stop(10)
    return figures


def lone(dsn: str, count: int) -> None:
    figures = lone_latencies(dsn, count)
    medians = {side: statistics.median(latencies) for side, (latencies, _) in figures.items()}
    print(f"{count:,} registrations one at a time, load average {os.getloadavg()[0]:.2f}")
    for side, (latencies, cpu) in figures.items():
        print(f"{side:8} p50 {medians[side] * 1e3:.3f} ms  "
              f"CPU {cpu / len(latencies) * 1e6:.0f} us per registration")
    print(f"naive p50 / journal p50: {medians['naive'] / medians['journal']:.2f}x "
          "(above 1: a lone registration commits sooner through the Journal)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a superuser DSN (a scratch database is created)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--appenders", type=int, default=16, help="appending threads")
    parser.add_argument("--group", type=int, default=10, help="events per append call")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--max-delay", type=float, default=0.005)
    parser.add_argument("--lone", type=int, metavar="N",
                        help="N registrations one at a time, against the naive write")
    args = parser.parse_args(argv)
    if args.lone:
        with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_lone") as dsn:
            lone(dsn, args.lone)
        return 0
    events = wakeup_workload(args.events)
    with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_journal") as dsn:
        rate, batches = journal_rate(dsn, events, args.appenders, args.group,
                                     args.max_batch, args.max_delay)
        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        batched, single = raw_copy_rate(dsn, events, args.max_batch)
    print(f"PostgreSQL {version[0] if version else '?'}, {len(events):,} events, "
          f"{args.appenders} appenders x {args.group} events per append")
    print(f"journal (group commit, chain, projections): {rate:10,.0f} events/s "
          f"({batches:,} transactions, {len(events) / max(batches, 1):,.0f} events each)")
    print(f"raw COPY, {args.max_batch:,} rows per transaction:  {batched:10,.0f} rows/s")
    print(f"raw COPY, one transaction:               {single:10,.0f} rows/s")
    print(f"journal / raw COPY (same batch size):    {rate / batched:10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
