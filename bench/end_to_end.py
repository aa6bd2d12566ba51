"""End to end: one `python -m relay wakeup` over N registered tokens, every outcome durable.

    python -m bench.end_to_end -n 10000 100000 1000000 [--dsn SUPERUSER_DSN]
    python -m bench.end_to_end -n 1000000 --history-runs 4     # 5M events in the log first
    python -m bench.end_to_end -n 100000 --mix                 # 1% dead, 1% 503 twice

For each N: a scratch database (on a private PostgreSQL cluster started for the
bench unless --dsn is given) is seeded with `bench.replay.realistic_log`'s events
(registrations, optionally `--history-runs` finished runs before them) through
`events.batch_sql.append_bulk`: the Journal's format, hash chain and cache tables.
The APNs simulator starts as its own process, then the relay runs one wakeup as a
separate process with a config file pointing at both. Printed per N:

* notifications/s end to end: final outcomes / (relay process start to exit);
* events appended/s over the same time;
* peak RSS of the relay (its process tree, polled from /proc);
* CPU seconds of the relay, of the PostgreSQL cluster (postmaster and every
  backend, over the relay's lifetime) and of the simulator;
* start to first send: relay process start to the first outcome's answer time in
  the log (an upper bound on the first send).

With --mix, 1% of the tokens answer 410 Unregistered and 1% answer 503 twice and
then 200 (short back-off in the config), and the run's final counts are checked
against what the script implies. `--py-spy FILE` records the relay under py-spy
(collapsed stacks) for a profile; its figures then include the profiler.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.journal import migrated_database, server
from bench.replay import realistic_log
from events import types as ev
from events.batch_sql import append_bulk
from relay.simulator.cli import spawn

TOPIC = "org.example.bench"
ROOT = Path(__file__).resolve().parent.parent
POLL_INTERVAL = 0.1  # seconds between /proc samples of the relay's memory (cheap: 10/s)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIX_SHARE = 100  # one token in MIX_SHARE is dead, one more fails twice with 503


@dataclass(frozen=True)
class Figures:
    tokens: int
    log_events: int  # events in the log before the wakeup
    wall: float
    outcomes: int
    events: int
    peak_rss: int
    rss_quarters: list[int]  # RSS at 25, 50, 75 and 100% of the samples
    relay_cpu: float
    postgres_cpu: float
    simulator_cpu: float
    first_send: float | None
    exit_status: int
    run: dict[str, Any]


# --- seeding ------------------------------------------------------------------------------

def registry_log(tokens: int, history_runs: int, names: list[str]) -> Iterator[ev.Event]:
    """`bench.replay.realistic_log` cut after `history_runs` finished runs; collects tokens."""
    finished = 0
    for event in realistic_log(2**62, tokens):
        if event.type == ev.DEVICE_REGISTERED:
            names.append(event.data["token"])
        if finished == history_runs and event.type == ev.RUN_STARTED:
            return
        yield event
        if event.type == ev.RUN_FINISHED:
            finished += 1


def seed_registry(dsn: str, tokens: int, history_runs: int) -> tuple[list[str], int, float]:
    """Registrations (and past runs) through the Journal's format, chain and cache tables."""
    names: list[str] = []
    start = time.perf_counter()
    count = append_bulk(dsn, registry_log(tokens, history_runs, names))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return names, count, time.perf_counter() - start


# --- processes ------------------------------------------------------------------------------

def start_simulator(workdir: Path, scripts: list[str]) -> tuple[subprocess.Popen[str],
                                                                 dict[str, str]]:
    """`python -m relay simulator` in its own process; returns it and its `apns:` values."""
    options = ["--listen", "127.0.0.1:0", "--topic", TOPIC, "--generate-key", "--quiet",
               "--record-limit", "100", "--workdir", str(workdir)]
    for script in scripts:
        options += ["--script", script]
    return spawn(options, cwd=ROOT)


def relay_config(path: Path, dsn: str, apns: dict[str, str], args: argparse.Namespace) -> None:
    wakeup = {"progress_interval": "5s", **({"senders": args.senders} if args.senders else {}),
              **({"max_in_flight": args.max_in_flight} if args.max_in_flight else {})}
    if args.mix:
        wakeup.update(backoff_base="200ms", backoff_max="1s", breaker_pause="1s")
    lines = ["database:", f"  dsn: '{dsn}'", "apns:"]
    lines += [f"  {key}: '{apns[key]}'"
              for key in ("endpoint", "ca_file", "topic", "key_id", "team_id", "key_file")]
    lines += [f"  connections: {args.connections}", f"  processes: {args.processes}", "wakeup:"]
    lines += [f"  {key}: {value}" for key, value in wakeup.items()]
    path.write_text("\n".join(lines) + "\n")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rpartition(")")[2].split()


def cpu_seconds(pid: int, *, with_reaped: bool = True) -> float:
    """utime + stime (+ of the children it has reaped) of one process."""
    fields = _stat(pid)  # fields[11:15] = utime stime cutime cstime
    ticks = sum(int(x) for x in fields[11:15 if with_reaped else 13])
    return ticks / CLOCK_TICKS


def tree(pid: int) -> list[int]:
    """The process and its live descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


def tree_cpu(pid: int) -> float:
    total = 0.0
    for member in tree(pid):
        try:
            total += cpu_seconds(member)
        except OSError:
            continue
    return total


def tree_rss(pid: int) -> int:
    total = 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def postmaster_pid(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(_stat(int(row[0]))[1])  # the backend's parent, while it lives


class PeakRss:
    """Samples the RSS of a process tree on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self.samples: list[int] = []  # every sample, to show whether memory grows over the run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            rss = tree_rss(self.pid)
            if rss:  # 0: the process has exited, waiting to be reaped
                self.samples.append(rss)
                self.peak = max(self.peak, rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# --- one measurement ------------------------------------------------------------------------

def log_head(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT position FROM log_head").fetchone()
    return int(row[0]) if row else 0


def run_wakeup(dsn: str, tokens: int, history_runs: int, args: argparse.Namespace,
               workdir: Path) -> Figures:
    names, count, seeded = seed_registry(dsn, tokens, history_runs)
    print(f"  seeded {count:,} events ({tokens:,} tokens, {history_runs} past runs) "
          f"in {seeded:.1f} s", flush=True)
    scripts = []
    if args.mix:
        scripts += [f"{t}=410:Unregistered" for t in names[0::MIX_SHARE]]
        scripts += [f"{t}=503:ServiceUnavailable,503:ServiceUnavailable"
                    for t in names[1::MIX_SHARE]]
    del names
    postmaster = postmaster_pid(dsn)
    head = log_head(dsn)
    (workdir / "simulator").mkdir()
    simulator, apns = start_simulator(workdir / "simulator", scripts)
    config = workdir / "relay.yaml"
    command = [sys.executable, "-m", "relay", "-c", str(config), "wakeup"]
    if args.py_spy:
        command = ["py-spy", "record", "--format", "raw", "-r", "200", "-o", args.py_spy,
                   "--subprocesses", "--", *command]
    try:
        relay_config(config, dsn, apns, args)
        pg0, sim0 = tree_cpu(postmaster), cpu_seconds(simulator.pid)
        with (workdir / "relay.log").open("w") as log_file:
            started = time.time()
            relay = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
            memory = PeakRss(relay.pid)
            _, status, usage = os.wait4(relay.pid, 0)
            wall = time.time() - started
            relay.returncode = os.waitstatus_to_exitcode(status)
            peak = memory.stop()
        time.sleep(0.3)  # the relay's backends exit and are reaped by the postmaster
        pg_cpu, sim_cpu = tree_cpu(postmaster) - pg0, cpu_seconds(simulator.pid) - sim0
    finally:
        simulator.terminate()
        simulator.wait()
    if relay.returncode != 0:
        print((workdir / "relay.log").read_text()[-4000:], file=sys.stderr)
    with psycopg.connect(dsn) as conn:
        run_row = conn.execute(
            "SELECT run, tokens, delivered, failed, abandoned, unregistered,"
            " finished_at_ms IS NOT NULL FROM runs ORDER BY run DESC LIMIT 1").fetchone()
        assert run_row is not None
        first = conn.execute(
            "SELECT convert_from(body, 'UTF8')::json->>'at' FROM events"
            " WHERE position > %s AND type LIKE 'notification_%%'"
            " ORDER BY position LIMIT 1", (head,)).fetchone()
        active = conn.execute("SELECT count(*) FROM devices WHERE active").fetchone()
    assert active is not None
    keys = ("run", "tokens", "delivered", "failed", "abandoned", "unregistered", "finished")
    run = dict(zip(keys, run_row, strict=True)) | {"active_after": int(active[0])}
    first_send = None if first is None else ev.parse_iso_ms(first[0]) / 1000 - started
    return Figures(
        tokens=tokens, log_events=head, wall=wall,
        outcomes=run["delivered"] + run["abandoned"] + run["unregistered"],
        events=log_head(dsn) - head, peak_rss=peak,
        rss_quarters=[memory.samples[max(0, len(memory.samples) * q // 4 - 1)]
                      for q in range(1, 5)] if memory.samples else [],
        relay_cpu=usage.ru_utime + usage.ru_stime, postgres_cpu=pg_cpu, simulator_cpu=sim_cpu,
        first_send=first_send, exit_status=relay.returncode, run=run)


def check_mix(figures: Figures) -> list[str]:
    """What the run's counts must be, given the simulator's script."""
    n = figures.tokens
    dead, flaky = len(range(0, n, MIX_SHARE)), len(range(1, n, MIX_SHARE))
    expected = {"tokens": n, "delivered": n - dead, "failed": dead + 2 * flaky,
                "abandoned": 0, "unregistered": dead, "finished": True,
                "active_after": n - dead}
    return [f"{key}: expected {value}, got {figures.run[key]}"
            for key, value in expected.items() if figures.run[key] != value]


def report(figures: Figures) -> None:
    f = figures
    total_cpu = f.relay_cpu + f.postgres_cpu + f.simulator_cpu
    first = "n/a" if f.first_send is None else f"{f.first_send:.2f} s"
    print(f"  N={f.tokens:,} (log had {f.log_events:,} events)  exit {f.exit_status}  "
          f"run {f.run}")
    print(f"  notifications/s end to end: {f.outcomes / f.wall:8,.0f}   "
          f"({f.outcomes:,} outcomes in {f.wall:.2f} s, process start to exit)")
    print(f"  events appended/s:          {f.events / f.wall:8,.0f}   ({f.events:,} events)")
    quarters = " / ".join(f"{rss / 2**20:.1f}" for rss in f.rss_quarters)
    print(f"  peak RSS of the relay:      {f.peak_rss / 2**20:8.1f} MB   "
          f"(at 25/50/75/100% of the run: {quarters} MB)")
    print(f"  CPU seconds: relay {f.relay_cpu:.1f}, PostgreSQL {f.postgres_cpu:.1f}, "
          f"simulator {f.simulator_cpu:.1f} (of {total_cpu:.1f}: relay "
          f"{f.relay_cpu / total_cpu:.0%}, PostgreSQL {f.postgres_cpu / total_cpu:.0%}, "
          f"simulator {f.simulator_cpu / total_cpu:.0%}); relay "
          f"{f.relay_cpu / max(1, f.outcomes) * 1e6:.0f} us per notification")
    print(f"  start to first send:        {first}", flush=True)


# Which part of the relay a sampled stack belongs to: the first of these frames in it.
PROFILE_PARTS = (("ApnsClient._run", "APNs client (HTTP/2, TLS)"),
                 ("serve (relay/apns/processes.py", "APNs client (HTTP/2, TLS)"),
                 ("SenderShard", "Sender shards"), ("Dispatcher", "Dispatcher"),
                 ("Journal", "Journal (group commit)"), ("ApnsProcessPool", "process pool"),
                 ("<module>", "start-up and main thread"))
IDLE_FRAMES = ("Condition.wait", "EpollSelector.select", "Connection.wait", "Event.wait",
               "Connection.recv", "Connection.poll", "_recv_bytes")


def summarize_profile(path: str, top: int = 25) -> None:
    """Busy samples of a py-spy raw profile: the share of each part, then the hottest frames."""
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    busy = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")[1:]
            if not frames or frames[-1].startswith(IDLE_FRAMES):
                continue
            samples = int(count)
            busy += samples
            part = next((name for key, name in PROFILE_PARTS
                         if any(key in frame for frame in frames)), "other")
            parts[part] += samples
            own[frames[-1]] += samples
    print(f"  profile: {busy:,} busy samples")
    for name, samples in parts.most_common():
        print(f"    {samples / busy:6.1%}  {name}")
    print("  hottest frames (self time):")
    for frame, samples in own.most_common(top):
        print(f"    {samples / busy:6.1%}  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, nargs="+", default=[10_000, 100_000],
                        help="registered tokens, one wakeup per value")
    parser.add_argument("--dsn", help="a superuser DSN (default: a private cluster)")
    parser.add_argument("--history-runs", type=int, default=0,
                        help="finished runs over every token in the log before the wakeup")
    parser.add_argument("--mix", action="store_true",
                        help="1%% dead tokens, 1%% failing twice with 503; counts checked")
    parser.add_argument("--connections", type=int, default=1, help="apns.connections")
    parser.add_argument("--processes", type=int, default=0,
                        help="apns.processes: child processes running the connections")
    parser.add_argument("--senders", type=int, help="wakeup.senders (default: the relay's)")
    parser.add_argument("--max-in-flight", type=int, help="wakeup.max_in_flight")
    parser.add_argument("--py-spy", metavar="FILE", help="record the relay with py-spy")
    args = parser.parse_args(argv)
    failures = 0
    with server(args.dsn) as admin_dsn:
        for tokens in args.n:
            load = os.getloadavg()
            print(f"N = {tokens:,}  (load average before: {load[0]:.2f} {load[1]:.2f} "
                  f"{load[2]:.2f})", flush=True)
            with tempfile.TemporaryDirectory(prefix="relay-e2e-") as workdir, \
                    migrated_database(admin_dsn, "bench_e2e") as dsn:
                figures = run_wakeup(dsn, tokens, args.history_runs, args, Path(workdir))
            report(figures)
            if args.py_spy:
                summarize_profile(args.py_spy)
            problems = check_mix(figures) if args.mix else []
            if not figures.run["finished"]:
                problems.append("the run did not finish")
            for problem in problems:
                print(f"  MISMATCH {problem}")
            if args.mix and not problems:
                print("  final counts match the script (dead, retried, delivered)")
            failures += bool(problems) or figures.exit_status != 0
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
