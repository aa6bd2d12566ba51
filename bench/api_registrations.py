"""Registrations per second through the device API, with p50/p99 latency.

The relay side runs in this process exactly as the supervisor wires it: the real
Journal (group commit) and Registry actor on real PostgreSQL, behind ApiServer.
The load comes from separate processes (aiohttp clients, each with a number of
concurrent keep-alive connections) over loopback, each POSTing fresh random
tokens. A request counts when it answered 200, i.e. after its COMMIT; at the end
the event log must hold one `device_registered` per counted request.

    python bench/api_registrations.py [--dsn ADMIN_DSN] [--processes 2]
        [--connections 32] [--requests 20000]

ADMIN_DSN (default: $RELAY_TEST_DSN, else postgresql://postgres@127.0.0.1:5432/postgres)
must be allowed to create databases; a scratch database is created and dropped.
Target (issue 6): >= 2,000 registrations/s with p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import secrets
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.registry import RegistryHandle
from bench.journal import migrated_database
from events.journal import Journal
from events.store import LogReader
from relay.api import ApiServer
from relay.config import Config, HttpConfig
from relay.supervisor import freeze_startup_heap

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
WARMUP_PER_PROCESS = 200
TARGET_RATE = 2000.0
TARGET_P99 = 0.050


@dataclass
class Load:
    """What one load process measured (seconds, wall clock)."""

    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0


async def _drive(url: str, count: int, connections: int) -> Load:
    load = Load()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(measure: bool) -> None:
            started = time.perf_counter()
            try:
                async with session.post(url, json={"token": secrets.token_hex(32)}) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                load.failures[type(exc).__name__] += 1
                return
            if status != 200:
                load.failures[str(status)] += 1
            elif measure:
                load.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(post(False) for _ in range(WARMUP_PER_PROCESS)))
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await post(True)

        load.started = time.time()
        await asyncio.gather(*(worker() for _ in range(connections)))
        load.finished = time.time()
    return load


def _load_process(url: str, count: int, connections: int, barrier: object) -> Load:
    barrier.wait()  # type: ignore[attr-defined]
    return asyncio.run(_drive(url, count, connections))


def _cpu_seconds() -> float:
    """CPU of this process (API, Registry and Journal threads; the load runs elsewhere)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("RELAY_TEST_DSN", DEFAULT_ADMIN_DSN))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32, help="per load process")
    parser.add_argument("--requests", type=int, default=20000, help="measured, in total")
    args = parser.parse_args(argv)

    with migrated_database(args.dsn, "relay_bench") as dsn:
        return _measure(args, dsn)


def _measure(args: argparse.Namespace, dsn: str) -> int:
    config = replace(Config(), http=HttpConfig(listen=("127.0.0.1", 0), rate_limit=0))
    journal = Journal(dsn)
    journal.start()
    registry = RegistryHandle.start(journal, LogReader(dsn), config.registry)

    class Health:
        def database_available(self) -> bool:
            return journal.database_available

        def worker_alive(self) -> bool:
            return True

    server = ApiServer(config, registry, Health())
    server.start()
    freeze_startup_heap()  # as the supervisor does once its parts run
    url = "http://{}:{}/devices".format(*server.bound_address)
    try:
        context = multiprocessing.get_context("spawn")
        barrier = context.Manager().Barrier(args.processes)
        share = args.requests // args.processes
        with context.Pool(args.processes) as pool:
            cpu_before = _cpu_seconds()
            loads = pool.starmap(_load_process, [(url, share, args.connections, barrier)
                                                 for _ in range(args.processes)])
        relay_cpu = _cpu_seconds() - cpu_before
    finally:
        server.stop()
        registry.stop(timeout=30)
        journal.stop(timeout=30)

    latencies = [x for load in loads for x in load.latencies]
    failures: Counter[str] = sum((load.failures for load in loads), Counter())
    wall = max(load.finished for load in loads) - min(load.started for load in loads)
    with psycopg.connect(dsn) as conn:
        logged = conn.execute(
            "SELECT count(*) FROM events WHERE type = 'device_registered'").fetchone()

    accepted = len(latencies) + args.processes * WARMUP_PER_PROCESS - sum(failures.values())
    rate = len(latencies) / wall
    p50, p99 = _percentile(latencies, 0.50), _percentile(latencies, 0.99)
    print(f"load: {args.processes} processes x {args.connections} connections, "
          f"{len(latencies)} measured registrations in {wall:.2f} s")
    print(f"registrations/s: {rate:.0f}")
    print(f"latency: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"mean {statistics.fmean(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    total = len(latencies) + args.processes * WARMUP_PER_PROCESS
    print(f"relay CPU: {relay_cpu:.2f} s, {relay_cpu / total * 1e6:.0f} us per registration "
          f"(a bound of {total / relay_cpu:.0f}/s per relay CPU-second)")
    print(f"failures: {dict(failures) or 'none'}; device_registered events: "
          f"{logged[0] if logged else 0} (expected >= {accepted})")
    met = rate >= TARGET_RATE and p99 < TARGET_P99
    print(f"target (>= {TARGET_RATE:.0f}/s, p99 < {TARGET_P99 * 1000:.0f} ms): "
          f"{'met' if met else 'NOT met'}")
    return 0 if met and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
