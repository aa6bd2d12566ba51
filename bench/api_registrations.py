"""Registrations per second through the device API, against a naive endpoint, same load.

The relay side runs in this process exactly as the supervisor wires it: the real
Journal (group commit) and Registry actor on real PostgreSQL, behind ApiServer.
With `--peer naive`, the naive endpoint (`bench/peers/naive_registrations.py`:
aiohttp, one INSERT ... ON CONFLICT and COMMIT per request, a pool of 16
connections) runs as its own process on its own scratch database. The load comes
from `wrk` (Debian's package `wrk`; `--load python` uses aiohttp clients in separate
processes instead): keep-alive connections in a closed loop, a fresh random token per
request (bench/register.lua), over loopback. wrk, in C, spends a few microseconds per
request, where the aiohttp clients took about as much CPU as the server they loaded,
on a machine of two cores. At each level of concurrent clients both servers get
the same load for the same time, in alternating slices (relay, naive, naive, relay,
...: `--rounds` of each), so that a change in the shared machine's load between slices
touches both alike. A request counts when it answered 200, i.e. after its COMMIT; at the
end the relay's log must hold one `device_registered` per counted request.

    python bench/api_registrations.py --peer naive [--clients 1 4 16 64] [--seconds 6]
                                      [--rounds 3] [--load wrk|python]
    python bench/api_registrations.py                # the relay alone

ADMIN_DSN (--dsn; default $RELAY_TEST_DSN, else postgresql://postgres@127.0.0.1:5432/postgres)
must be allowed to create databases; scratch databases are created and dropped.
Targets (issue 14): >= 1.5x naive at 16 and 64 clients, >= 0.9x at 1 client, p99 < 50 ms
at 64 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.registry import RegistryHandle
from bench.journal import migrated_database
from events.journal import Journal
from events.store import LogReader
from relay import metrics
from relay.api import ApiServer
from relay.config import Config, HttpConfig
from relay.database import scratch_database, with_dbname
from relay.supervisor import freeze_startup_heap

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
WARMUP = 0.5  # seconds of load before measuring, at each level
MAX_LOAD_PROCESSES = 2
TARGETS = {1: 0.9, 16: 1.5, 64: 1.5}  # clients -> least ratio relay/naive
TARGET_P99 = 0.050  # at 64 clients


@dataclass
class Load:
    """What one load process measured (seconds)."""

    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    # wrk reports quantiles, not every latency: `latencies` then holds its 1,000
    # quantiles, each standing for `weight` requests of the `count` it answered.
    weight: float = 1.0
    count: int | None = None

    @property
    def answered(self) -> int:
        return len(self.latencies) if self.count is None else self.count


async def _drive(url: str, connections: int, seconds: float) -> Load:
    load = Load()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from, end = start + WARMUP, start + WARMUP + seconds

        async def worker() -> None:
            while (started := time.perf_counter()) < end:
                try:
                    async with session.post(url, json={"token": secrets.token_hex(32)}) as answer:
                        await answer.read()
                        status = answer.status
                except aiohttp.ClientError as exc:
                    load.failures[type(exc).__name__] += 1
                    continue
                if status != 200:
                    load.failures[str(status)] += 1
                elif started >= measure_from:
                    load.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return load


def _load_process(url: str, connections: int, seconds: float) -> Load:
    return asyncio.run(_drive(url, connections, seconds))


WRK_SCRIPT = Path(__file__).resolve().parent / "register.lua"


def _wrk(url: str, connections: int, seconds: float) -> Load:
    """One wrk run (one thread: the machine's other core is the servers'); its 1,000
    latency quantiles come back as a Load whose points each weigh their share of the
    requests wrk counted."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
               "--timeout", "10s", "-s", str(WRK_SCRIPT), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    quantiles = [us / 1e6 for us in result["quantiles_us"]]
    load = Load(quantiles, weight=result["requests"] / len(quantiles), count=result["requests"])
    if result["status_errors"]:
        load.failures["non-200"] += result["status_errors"]
    if result["socket_errors"]:
        load.failures["socket"] += result["socket_errors"]
    return load


def _wrk_slice(url: str, connections: int, seconds: float) -> Load:
    """A warm-up run (not counted), then the measured one."""
    _wrk(url, connections, WARMUP)
    return _wrk(url, connections, seconds)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(loads: list[Load], fraction: float) -> float:
    """The pooled `fraction` quantile of every load's latencies, each with its weight."""
    points = sorted((x, load.weight) for load in loads for x in load.latencies)
    wanted, seen = fraction * sum(weight for _, weight in points), 0.0
    for value, weight in points:
        seen += weight
        if seen > wanted:
            return value
    return points[-1][0] if points else 0.0


@dataclass(frozen=True)
class Figures:
    rate: float
    p50: float
    p99: float
    failures: Counter[str]
    count: int
    batch: float = 0.0  # mean events per group commit (the relay's)

    def row(self) -> str:
        return f"{self.rate:8.0f}/s  p50 {self.p50 * 1000:5.1f} ms  p99 {self.p99 * 1000:5.1f} ms"


@dataclass
class Slices:
    """One server's measured slices at one level, pooled."""

    loads: list[Load] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0  # the server's CPU seconds while it was loaded
    events: float = 0.0  # the relay's: events and group commits in its slices
    commits: float = 0.0

    def figures(self) -> Figures:
        count = sum(load.answered for load in self.loads)
        failures: Counter[str] = sum((load.failures for load in self.loads), Counter())
        return Figures(count / max(self.seconds, 1e-9), _percentile(self.loads, 0.5),
                       _percentile(self.loads, 0.99), failures, count,
                       self.events / max(1.0, self.commits))


def _batches() -> tuple[float, float]:
    """(events, commits) the Journal of this process has committed so far."""
    total = count = 0.0
    for metric in metrics.APPEND_BATCH_SIZE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


def _load(pool: multiprocessing.pool.Pool | None, url: str, clients: int, seconds: float,
          cpu: Callable[[], float], into: Slices) -> None:
    """One slice: `clients` on `url` for the warm-up, then `seconds` measured (by wrk,
    or with `pool` by the Python clients)."""
    before, (events, commits) = cpu(), _batches()
    if pool is None:
        into.loads.append(_wrk_slice(url, clients, seconds))
    else:
        processes = min(MAX_LOAD_PROCESSES, clients)
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        into.loads += pool.starmap(_load_process, [(url, share, seconds) for share in shares])
    into.cpu += cpu() - before
    into.events += _batches()[0] - events
    into.commits += _batches()[1] - commits
    into.seconds += seconds


@contextmanager
def _relay(dsn: str) -> Iterator[str]:
    """The relay's Journal, Registry and API in this process; yields the POST URL."""
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
    try:
        yield "http://{}:{}/devices".format(*server.bound_address)
    finally:
        server.stop()
        registry.stop(timeout=30)
        journal.stop(timeout=30)


def _process_cpu(pid: int) -> float:
    """CPU seconds of another process so far (user + system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _naive(admin_dsn: str) -> Iterator[tuple[str, int]]:
    """The naive endpoint as its own process on its own database: (POST URL, pid)."""
    with scratch_database(admin_dsn, "naive_bench") as name:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.peers.naive_registrations",
             "--dsn", with_dbname(admin_dsn, name)],
            stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"the naive endpoint did not start: {line!r}")
            yield f"http://127.0.0.1:{int(line.split()[-1])}/devices", process.pid
        finally:
            process.terminate()
            process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("RELAY_TEST_DSN", DEFAULT_ADMIN_DSN))
    parser.add_argument("--peer", choices=["naive"], help="also load the naive endpoint")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="measured per server and level, over all its slices")
    parser.add_argument("--rounds", type=int, default=3,
                        help="slices per server and level, alternating with the peer's")
    parser.add_argument("--load", choices=["wrk", "python"], default="wrk",
                        help="the load generator (default wrk: apt-get install wrk)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    if args.load == "wrk" and shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian: apt-get install wrk); "
                     "or use --load python")
    slice_seconds = args.seconds / args.rounds
    if args.load == "wrk" and slice_seconds != math.ceil(slice_seconds):
        parser.error("with wrk, --seconds / --rounds must be whole seconds")

    print(f"load average before: {os.getloadavg()[0]:.2f}; load: {args.load}", flush=True)
    context = multiprocessing.get_context("spawn")
    relay: dict[int, Slices] = {}
    naive: dict[int, Slices] = {}
    with contextlib.ExitStack() as running:
        dsn = running.enter_context(migrated_database(args.dsn, "relay_bench"))
        pool = (running.enter_context(context.Pool(MAX_LOAD_PROCESSES))
                if args.load == "python" else None)
        servers = [("relay", running.enter_context(_relay(dsn)), _cpu_seconds, relay)]
        if args.peer == "naive":
            url, pid = running.enter_context(_naive(args.dsn))
            servers.append(("naive", url, lambda: _process_cpu(pid), naive))
        for clients in args.clients:
            for round_ in range(args.rounds):
                # relay, naive; then naive, relay: neither always goes first.
                for _, url, cpu, figures in servers[::-1] if round_ % 2 else servers:
                    _load(pool, url, clients, slice_seconds, cpu,
                          figures.setdefault(clients, Slices()))
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE type = 'device_registered'").fetchone()
        logged = row[0] if row else 0
    return _report({c: s.figures() for c, s in relay.items()},
                   {c: s.figures() for c, s in naive.items()},
                   (sum(s.cpu for s in relay.values()), sum(s.cpu for s in naive.values())),
                   logged)


def _report(relay: dict[int, Figures], naive: dict[int, Figures],
            cpu: tuple[float, float], logged: int) -> int:
    met = True
    print(f"\n{'clients':>7}  {'relay (mean events per commit)':<52}  {'naive':<40}  ratio  target")
    for clients, mine in relay.items():
        theirs = naive.get(clients)
        line = f"{clients:>7}  {mine.row() + f'  batch {mine.batch:4.1f}':<52}  "
        if theirs is not None:
            ratio = mine.rate / theirs.rate if theirs.rate else float("inf")
            target = TARGETS.get(clients)
            ok = target is None or ratio >= target
            met &= ok
            line += f"{theirs.row():<40}  {ratio:4.2f}x  " + (
                f">= {target}x {'met' if ok else 'NOT met'}" if target else "")
        print(line)
        if clients == 64:
            ok = mine.p99 < TARGET_P99
            met &= ok
            print(f"{'':>7}  p99 at 64 clients < {TARGET_P99 * 1000:.0f} ms: "
                  f"{'met' if ok else 'NOT met'}")
    counted = sum(f.count for f in relay.values())
    failures = sum((f.failures for f in [*relay.values(), *naive.values()]), Counter())
    print(f"server CPU per measured registration (its slices' warm-ups included): relay "
          f"{cpu[0] / max(1, counted) * 1e6:.0f} us"
          + (f", naive {cpu[1] / max(1, sum(f.count for f in naive.values())) * 1e6:.0f} us "
             "(PostgreSQL not counted)" if naive else ""))
    print(f"failures: {dict(failures) or 'none'}; "
          f"device_registered events: {logged} (>= {counted} expected)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if met and not failures and logged >= counted else 1


if __name__ == "__main__":
    sys.exit(main())
