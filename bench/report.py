"""HTML audit report speed: `relay audit --html` over a log of 1,000,000 events.

    python -m bench.report [--dsn SUPERUSER_DSN] [--events 1000000] [--tokens 100000]

Seeds a scratch database (as bench/replay.py) with a log holding every kind of outcome
(`mixed_log`), settles it, then times, alternating twice, `audit --verify --json` (the
alternative: the plain verified audit) and `audit --html` on the same log, and prints
both and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from bench.journal import migrated_database, server
from bench.replay import settle
from events import types as ev
from events.audit import audit_main
from events.batch_sql import append_bulk

T0 = 1_760_000_000_000
HOUR = 3_600_000


def mixed_log(count: int, tokens: int, seed: int = 5) -> Iterator[ev.Event]:
    """Registrations, then hourly runs. Per token and run: 95% delivered at once, 3% one
    429 then delivered, 1% 503 until abandoned (3 attempts), 0.6% 410 Unregistered (then
    unregistered, or kept when the device registered again), 0.4% 400 BadDeviceToken."""
    rng = random.Random(seed)
    names = [f"{rng.getrandbits(256):064x}" for _ in range(tokens)]
    emitted = 0

    def apns_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    def registrations() -> Iterator[ev.Event]:
        for i, token in enumerate(names):
            yield ev.device_registered(token, T0 + i)

    def run(number: int) -> Iterator[ev.Event]:
        at = T0 + number * HOUR
        yield ev.run_started(number, at, len(names))
        for token in list(names):
            at += 1
            draw, latency = rng.random(), rng.lognormvariate(3, 0.5)
            if draw < 0.95:
                yield ev.notification_delivered(number, token, at, attempt=1,
                                                apns_id=apns_id(), status=200,
                                                latency_ms=latency)
            elif draw < 0.98:
                yield ev.notification_failed(
                    number, token, at, attempt=1, apns_id=apns_id(), status=429,
                    reason="TooManyRequests", verdict="transient", apple_timestamp_ms=None,
                    latency_ms=latency, next_attempt_at_ms=at + 900_000)
                yield ev.notification_delivered(number, token, at + 900_000, attempt=2,
                                                apns_id=apns_id(), status=200,
                                                latency_ms=latency)
            elif draw < 0.99:
                for attempt in (1, 2, 3):
                    yield ev.notification_failed(
                        number, token, at, attempt=attempt, apns_id=apns_id(), status=503,
                        reason="ServiceUnavailable", verdict="transient",
                        apple_timestamp_ms=None, latency_ms=latency,
                        next_attempt_at_ms=None if attempt == 3 else at + 900_000)
                yield ev.notification_abandoned(number, token, at, attempts=3,
                                                apns_id=apns_id(),
                                                last_reason="ServiceUnavailable")
            else:
                status, reason = ((410, "Unregistered") if draw < 0.996
                                  else (400, "BadDeviceToken"))
                yield ev.notification_failed(
                    number, token, at, attempt=1, apns_id=apns_id(), status=status,
                    reason=reason, verdict="dead_token", apple_timestamp_ms=at - 5_000,
                    latency_ms=latency, next_attempt_at_ms=None)
                if rng.random() < 0.8:
                    yield ev.device_unregistered(token, at + 1, reason, run=number,
                                                 apple_timestamp_ms=at - 5_000)
                    names.remove(token)
                else:
                    yield ev.unregister_skipped(token, at + 1, reason, verdict_at_ms=at - 5_000,
                                                registered_at_ms=at - 1_000,
                                                why="registered again after the verdict",
                                                run=number, apple_timestamp_ms=at - 5_000)
        # The seeded log's runs carry zero counts: the report folds them from the events.
        yield ev.run_finished(number, at + 1_000, tokens=len(names), delivered=0, failed=0,
                              abandoned=0, dead=0, unregistered=0, kept=0)

    number = 0
    stream: Iterator[ev.Event] = registrations()
    while True:
        for event in stream:
            if emitted == count:
                return
            yield event
            emitted += 1
        number += 1
        stream = run(number)


def timed(dsn: str, argv: list[str]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        status = audit_main(dsn, argv, interval=3600.0)
        elapsed = time.perf_counter() - start
    assert status == 0, f"audit {argv} exited {status}"
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a superuser DSN (a scratch database is created)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args(argv)
    with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_report") as dsn, \
            tempfile.TemporaryDirectory() as directory:
        count = append_bulk(dsn, mixed_log(args.events, args.tokens))
        settle(dsn)
        page = Path(directory) / "report.html"
        audits, reports = [], []
        for _ in range(2):
            audits.append(timed(dsn, ["--verify", "--json", "--jobs", "1"]))
            reports.append(timed(dsn, ["--html", str(page)]))
        size = page.stat().st_size
    audit, report = min(audits), min(reports)
    print(f"{count:,} events, {args.tokens:,} tokens")
    print(f"audit --verify --jobs 1: {', '.join(f'{t:.2f}' for t in audits)} s")
    print(f"audit --html:            {', '.join(f'{t:.2f}' for t in reports)} s "
          f"({count / report:,.0f} events/s; page {size / 1024:,.0f} KiB)")
    print(f"the report costs {report / audit:.2f}x the verified audit (best of each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
