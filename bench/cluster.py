"""Several relays on one PostgreSQL: one run shared by 1, 2, 3 processes, and a kill -9.

    python -m bench.cluster -n 100000 --processes 1 2 3 [--baseline main] [--dsn DSN]

For each process count P, on a scratch database of a private PostgreSQL cluster (or
--dsn) seeded with N registered tokens (`bench.end_to_end.seed_registry`) and the APNs
simulator as its own process: P supervisors (`python -m relay`) start, join the cluster
and share the shards; the run is made due a few seconds later (a finished empty run is
seeded `wakeup.interval` before), so every process is up when it starts. Printed per P:

* notifications/s: tokens / (run_finished - run_started, the log's times);
* CPU seconds per 1,000 notifications of the relay processes (all of them) and of
  PostgreSQL (postmaster and every backend), over the run;
* lease churn: shard_leased + shard_released events during the run;
* coordination cost per token: (relay CPU with P - relay CPU with 1) / N. These 2 cores
  cannot show scaling by wall time: what P processes add in CPU is what the cluster costs.

Then, for each P >= 2, the same run with one process killed (-9) at a third of it:
the takeover time (kill to the first `shard_leased` taking one of its shards over, by the
log) and the re-sends (tokens the simulator saw twice, from its request log).

`--baseline REF` also runs `python -m relay wakeup` of REF (a `git worktree` of it, its
own code and migrations) and of this tree over the same N, alternately, twice each: the
one-process-versus-before comparison, in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.end_to_end import ROOT, TOPIC, postmaster_pid, seed_registry, tree_cpu
from bench.journal import migrated_database, server
from events import types as ev
from events.batch_sql import append_bulk
from relay.simulator.cli import spawn

INTERVAL = 3600  # wakeup.interval: long, so the measured run is the only one
RAMP = 15.0  # seconds from the processes' start to the run: all joined, shards balanced
KILL_AT = 1 / 3  # of the run's tokens done when one process is killed
_SENT = re.compile(r"token ([0-9a-f]{8})")


@dataclass
class Result:
    processes: int
    tokens: int
    duration: float  # run_started to run_finished, by the log
    relay_cpu: float
    postgres_cpu: float
    churn: int
    takeover: float | None = None
    resent: int | None = None

    @property
    def rate(self) -> float:
        return self.tokens / self.duration


def _config(path: Path, dsn: str, apns: dict[str, str], port: int) -> Path:
    lines = ["database:", f"  dsn: '{dsn}'", f"  data_dir: '{path.parent}'", "http:",
             f"  listen: 127.0.0.1:{port}", "apns:"]
    lines += [f"  {key}: '{apns[key]}'"
              for key in ("endpoint", "ca_file", "topic", "key_id", "team_id", "key_file")]
    lines += ["wakeup:", f"  interval: {INTERVAL}", "  progress_interval: 30s"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Simulator:
    """The simulator process; with `count`, its request log is read for sends per token."""

    def __init__(self, workdir: Path, *, count: bool) -> None:
        workdir.mkdir()
        options = ["--listen", "127.0.0.1:0", "--topic", TOPIC, "--generate-key",
                   "--record-limit", "100", "--workdir", str(workdir)]
        self.sent: Counter[str] = Counter()
        self._reader: threading.Thread | None = None
        if not count:
            self.process, self.apns = spawn([*options, "--quiet"], cwd=ROOT)
            return
        # Its request log (one line per request, on stderr) read with its config block.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay.simulator.cli", *options], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.apns = {}
        for line in self.process.stdout:
            if not line.strip() and "endpoint" in self.apns:
                break
            key, separator, value = line.strip().partition(": ")
            if separator and key in ("endpoint", "ca_file", "topic", "key_id", "team_id",
                                     "key_file"):
                self.apns[key] = value
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            found = _SENT.search(line)
            if found:
                self.sent[found.group(1)] += 1

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        if self._reader is not None:
            self._reader.join(5)


def _seed_due_run(dsn: str, due_in: float) -> None:
    """A finished empty run 1, started `INTERVAL - due_in` seconds ago: run 2 is due then."""
    started = ev.now_ms() - round((INTERVAL - due_in) * 1000)
    append_bulk(dsn, [ev.run_started(1, started, 0), ev.run_finished(
        1, started, tokens=0, delivered=0, failed=0, abandoned=0, dead=0, unregistered=0,
        kept=0)])


def _log_row(dsn: str, sql: str, params: Any = ()) -> Any:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchone()


def _wait(what: str, check: Any, timeout: float = 1800.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise SystemExit(f"bench.cluster: {what} never happened")


def _done(dsn: str, run: int) -> int:
    row = _log_row(dsn, "SELECT delivered + abandoned + dead FROM runs WHERE run = %s", (run,))
    return int(row[0]) if row else 0


def measure(admin_dsn: str, tokens: int, processes: int, *, kill: bool,
            workdir: Path) -> Result:
    with migrated_database(admin_dsn, "bench_cluster") as dsn:
        seed_registry(dsn, tokens, 0)
        simulator = Simulator(workdir / f"sim-{processes}-{kill}", count=kill)
        relays: list[subprocess.Popen[bytes]] = []
        try:
            _seed_due_run(dsn, RAMP)
            for i in range(processes):
                home = workdir / f"relay-{processes}-{kill}-{i}"
                home.mkdir()
                config = _config(home / "relay.yaml", dsn, simulator.apns, _free_port())
                with (home / "relay.log").open("w") as out:
                    relays.append(subprocess.Popen(
                        [sys.executable, "-m", "relay", "-c", str(config)], stdout=out,
                        stderr=subprocess.STDOUT, cwd=ROOT))
            postmaster = postmaster_pid(dsn)
            _wait("run 2 to start", lambda: _log_row(
                dsn, "SELECT 1 FROM runs WHERE run = 2 AND started_at_ms IS NOT NULL"))
            relay0 = sum(tree_cpu(r.pid) for r in relays)
            pg0 = tree_cpu(postmaster)
            killed_at: float | None = None
            victim = relays[1] if kill else None
            if victim is not None:
                _wait("a third of the run", lambda: _done(dsn, 2) >= tokens * KILL_AT)
                victim_cpu = tree_cpu(victim.pid)
                victim.send_signal(signal.SIGKILL)
                killed_at = time.time()
                victim.wait()
            _wait("run 2 to finish", lambda: _log_row(
                dsn, "SELECT 1 FROM runs WHERE run = 2 AND finished_at_ms IS NOT NULL"),
                every=0.2)
            relay_cpu = sum(tree_cpu(r.pid) for r in relays if r is not victim) - relay0
            if victim is not None:
                relay_cpu += victim_cpu
            postgres_cpu = tree_cpu(postmaster) - pg0
        finally:
            for relay in relays:
                if relay.poll() is None:
                    relay.send_signal(signal.SIGTERM)
            for relay in relays:
                relay.wait(60)
            simulator.stop()
        return _figures(dsn, tokens, processes, relay_cpu, postgres_cpu, killed_at,
                        victim.pid if victim is not None else None, simulator.sent)


def _figures(dsn: str, tokens: int, processes: int, relay_cpu: float, postgres_cpu: float,
             killed_at: float | None, victim: int | None, sent: Counter[str]) -> Result:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT position, type, convert_from(body, 'UTF8')::json FROM events"
            " WHERE type IN ('run_started', 'run_finished', 'shard_leased', 'shard_released')"
            " ORDER BY position").fetchall()
    marks = {(kind, d["run"]): (position, ev.parse_iso_ms(d["at"]) / 1000)
             for position, kind, d in rows if kind in (ev.RUN_STARTED, ev.RUN_FINISHED)}
    first, started = marks[(ev.RUN_STARTED, 2)]
    last, finished = marks[(ev.RUN_FINISHED, 2)]
    churn = sum(1 for position, kind, _ in rows
                if kind in (ev.SHARD_LEASED, ev.SHARD_RELEASED) and first < position < last)
    takeover = None
    if killed_at is not None and victim is not None:
        taken = [ev.parse_iso_ms(d["at"]) / 1000 for _, kind, d in rows
                 if kind == ev.SHARD_LEASED and d["took_from"]
                 and d["took_from"].split(":")[-2] == str(victim)]
        takeover = min(taken) - killed_at if taken else None
    resent = sum(1 for count in sent.values() if count > 1) if killed_at is not None else None
    return Result(processes, tokens, finished - started, relay_cpu, postgres_cpu, churn,
                  takeover, resent)


def baseline(admin_dsn: str, tokens: int, ref: str, workdir: Path
             ) -> list[tuple[str, float, float]]:
    """`relay wakeup` of `ref` and of this tree, alternately, twice each: run durations
    and relay CPU seconds."""
    checkout = workdir / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), ref],
                   check=True, capture_output=True)
    try:
        runs = []
        for attempt in range(2):
            for name, tree in (("before", checkout), ("cluster", ROOT)):
                runs.append((name, *_one_wakeup(admin_dsn, tokens, tree,
                                                workdir / f"{name}-{attempt}")))
        return runs
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(checkout)], check=False, capture_output=True)


def _one_wakeup(admin_dsn: str, tokens: int, tree: Path, home: Path) -> tuple[float, float]:
    home.mkdir()
    with migrated_database(admin_dsn, "bench_cluster_base") as dsn:
        seed_registry(dsn, tokens, 0)
        simulator = Simulator(home / "sim", count=False)
        try:
            config = _config(home / "relay.yaml", dsn, simulator.apns, _free_port())
            env = {**os.environ, "PYTHONPATH": str(tree)}
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            with (home / "relay.log").open("w") as out:
                subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "wakeup"],
                               stdout=out, stderr=subprocess.STDOUT, cwd=tree, env=env,
                               check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        finally:
            simulator.stop()
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT started_at_ms, finished_at_ms FROM runs"
                               " ORDER BY run DESC LIMIT 1").fetchone()
        assert row is not None and row[1] is not None
        return (row[1] - row[0]) / 1000, cpu


def report(results: list[Result], tokens: int) -> None:
    print(f"\n{'P':>2} {'kill':>4} {'notif/s':>9} {'relay CPU s/1k':>14} {'PG CPU s/1k':>11}"
          f" {'churn':>5} {'takeover s':>10} {'re-sends':>8}")
    for r in results:
        killed = r.takeover is not None or r.resent is not None
        print(f"{r.processes:>2} {'yes' if killed else 'no':>4} {r.rate:>9.0f}"
              f" {1000 * r.relay_cpu / r.tokens:>14.3f} {1000 * r.postgres_cpu / r.tokens:>11.3f}"
              f" {r.churn:>5} {'' if r.takeover is None else f'{r.takeover:.1f}':>10}"
              f" {'' if r.resent is None else r.resent:>8}")
    plain = {r.processes: r for r in results if r.takeover is None and r.resent is None}
    if 1 in plain:
        one = plain[1]
        for p, r in sorted(plain.items()):
            if p > 1:
                extra = (r.relay_cpu - one.relay_cpu) / tokens * 1e6
                extra_pg = (r.postgres_cpu - one.postgres_cpu) / tokens * 1e6
                print(f"coordination cost with {p} processes: {extra:+.0f} us relay CPU and "
                      f"{extra_pg:+.0f} us PostgreSQL CPU per token (against 1 process)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100_000, help="registered tokens")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-kill", action="store_true", help="skip the kill -9 runs")
    parser.add_argument("--baseline", metavar="REF",
                        help="also time `relay wakeup` of this git ref, against this tree")
    parser.add_argument("--dsn", help="a superuser DSN (default: a private cluster)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"N = {args.n:,}  (load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="relay-cluster-"))
    results: list[Result] = []
    try:
        with server(args.dsn) as admin_dsn:
            for processes in args.processes:
                for kill in (False, True) if processes > 1 and not args.no_kill else (False,):
                    result = measure(admin_dsn, args.n, processes, kill=kill, workdir=workdir)
                    print(f"  P={processes} kill={kill}: {result.rate:.0f} notifications/s,"
                          f" load {os.getloadavg()[0]:.2f}", flush=True)
                    results.append(result)
            report(results, args.n)
            if args.baseline:
                runs = baseline(admin_dsn, args.n, args.baseline, workdir)
                for name, seconds, cpu in runs:
                    print(f"  relay wakeup ({name}): {args.n / seconds:.0f} notifications/s,"
                          f" relay CPU {1e6 * cpu / args.n:.0f} us per notification")
                before = sum(s for n, s, _ in runs if n == "before")
                after = sum(s for n, s, _ in runs if n == "cluster")
                print(f"one process, cluster over {args.baseline}: {before / after:.3f}x "
                      f"the rate (load {os.getloadavg()[0]:.2f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
