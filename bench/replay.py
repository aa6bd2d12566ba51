"""Audit replay speed: `relay audit --verify` over a log of 1,000,000 events.

    python -m bench.replay [--dsn SUPERUSER_DSN] [--events 1000000] [--tokens 100000]

Seeds a scratch database (created and dropped; DSN as in bench/journal.py) with a
realistic log through `events.batch_sql.append_bulk` (the Journal's format, chain and
cache tables, 50,000 events per transaction), times `relay rebuild` of the cache
tables, then `audit --verify --json` (hash chain, positions, columns against bodies,
the fold, head and table comparison) twice: right after the bulk load (PostgreSQL's first
reads of new rows still write hint bits; the checkpointer flushes the load) and after
`settle` (VACUUM, CHECKPOINT), as a log is when audited; then a plain `audit --json` and
`audit --token`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import time
import uuid
from collections.abc import Iterator

import psycopg

from bench.journal import migrated_database, server
from events import types as ev
from events.audit import audit_main, rebuild_main
from events.batch_sql import append_bulk

T0 = 1_760_000_000_000


def realistic_log(count: int, tokens: int, seed: int = 11) -> Iterator[ev.Event]:
    """Registrations, then hourly runs: ~3% of sends fail once and are retried."""
    rng = random.Random(seed)
    names = [f"{rng.getrandbits(256):064x}" for _ in range(tokens)]
    emitted = 0
    for i, token in enumerate(names):
        if emitted == count:
            return
        yield ev.device_registered(token, T0 + i)
        emitted += 1
    run = 0
    while True:
        run += 1
        at = T0 + run * 3_600_000
        events = [ev.run_started(run, at, len(names))]
        failed = 0
        for token in names:
            at += 1
            apns_id = str(uuid.UUID(int=rng.getrandbits(128)))
            if rng.random() < 0.03:
                failed += 1
                events.append(ev.notification_failed(
                    run, token, at, attempt=1, apns_id=apns_id, status=429,
                    reason="TooManyRequests", verdict="transient", apple_timestamp_ms=None,
                    latency_ms=rng.uniform(5, 80), next_attempt_at_ms=at + 900_000))
                events.append(ev.notification_delivered(run, token, at + 900_000, attempt=2,
                                                        apns_id=apns_id, status=200,
                                                        latency_ms=rng.uniform(5, 80)))
            else:
                events.append(ev.notification_delivered(run, token, at, attempt=1,
                                                        apns_id=apns_id, status=200,
                                                        latency_ms=rng.uniform(5, 80)))
        events.append(ev.run_finished(run, at + 1_000_000, tokens=len(names),
                                      delivered=len(names), failed=failed, abandoned=0,
                                      dead=0, unregistered=0, kept=0))
        for event in events:
            if emitted == count:
                return
            yield event
            emitted += 1


def settle(dsn: str) -> None:
    """Leave the log as it is by the time anyone audits it: vacuumed (hint bits and the
    visibility map set, so reads write nothing) and checkpointed (no flush of the bulk
    load competing for the CPU). Statistics are left as they are: no ANALYZE."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM events")
        conn.execute("CHECKPOINT")


def timed_audit(dsn: str, argv: list[str]) -> tuple[float, int, dict[str, object]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        start = time.perf_counter()
        status = audit_main(dsn, argv)
        elapsed = time.perf_counter() - start
    return elapsed, status, json.loads(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a superuser DSN (a scratch database is created)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args(argv)
    with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_replay") as dsn:
        start = time.perf_counter()
        count = append_bulk(dsn, realistic_log(args.events, args.tokens))
        seeded = time.perf_counter() - start
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            rebuild_main(dsn, [])
            rebuilt = time.perf_counter() - start
        fresh_time, fresh_status, _ = timed_audit(dsn, ["--verify", "--json"])
        settle(dsn)
        verify_time, status, report = timed_audit(dsn, ["--verify", "--json"])
        plain_time, _, _ = timed_audit(dsn, ["--json"])
        token = next(realistic_log(1, args.tokens)).data["token"]
        token_time, _, history = timed_audit(dsn, ["--json", "--token", token])
    print(f"{count:,} events, {args.tokens:,} tokens: seeded by append_bulk in {seeded:.1f} s, "
          f"caches rebuilt in {rebuilt:.1f} s ({count / rebuilt:,.0f} events/s)")
    print(f"audit --verify: {verify_time:6.2f} s = {count / verify_time:10,.0f} events/s "
          f"(exit {status}, verified={report.get('verified')})")
    print(f"  (just after the bulk load, before VACUUM and CHECKPOINT: {fresh_time:.2f} s = "
          f"{count / fresh_time:,.0f} events/s, exit {fresh_status})")
    print(f"audit:          {plain_time:6.2f} s = {count / plain_time:10,.0f} events/s")
    print(f"audit --token:  {token_time:6.2f} s ({len(history['history'])} events of one token)")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
