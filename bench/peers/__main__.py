"""Wakeups against the clients a user would pick instead: node-apn, aioapns, the relay.

    python -m bench.peers -n 100000 [--dsn SUPERUSER_DSN]

One after another, each against a fresh APNs simulator process (real TLS, HTTP/2 and JWT
checks), N background notifications to N tokens:

* @parse/node-apn (`bench/peers/node_apn_driver.js`, batches of 1,000), no record kept;
* aioapns (`bench/peers/aioapns_driver.py`, 1,000 in flight), no record kept;
* `python -m relay wakeup` over N tokens seeded in its event log (`bench.end_to_end`),
  every outcome committed to the log before its credit returns.

Printed per client: notifications/s (outcomes / process start to exit), client CPU µs per
notification (the process's own rusage), peak RSS of its process tree, and the relay's
ratios. Targets (issue 14): the relay's CPU per durable notification <= node-apn's CPU
per notification; the relay's rate >= 1.5x aioapns'. The peers are installed here when
missing (`npm install` in bench/peers, `pip install aioapns`): no dependency of the relay.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.end_to_end import PeakRss, run_wakeup, start_simulator
from bench.journal import migrated_database, server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TARGET_CPU_RATIO = 1.0  # relay / node-apn, at most
TARGET_RATE_RATIO = 1.5  # relay / aioapns, at least


@dataclass(frozen=True)
class Result:
    name: str
    notifications: int
    wall: float
    cpu: float
    peak_rss: int

    @property
    def rate(self) -> float:
        return self.notifications / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(1, self.notifications) * 1e6


def _install_peers() -> None:
    if not (HERE / "node_modules" / "@parse" / "node-apn").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=HERE,
                       check=True)
    if importlib.util.find_spec("aioapns") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "aioapns"],
                       check=True)


def _peer(name: str, command: list[str], workdir: Path) -> Result:
    """Run one peer against a fresh simulator; its figures from its own process."""
    (workdir / name).mkdir()
    simulator, apns = start_simulator(workdir / name, [])
    try:
        argv = [part.format(**apns) for part in command]
        started = time.time()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        memory = PeakRss(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - started
        peak = memory.stop()
        assert process.stdout is not None
        output = process.stdout.read().split()
    finally:
        simulator.terminate()
        simulator.wait()
    if os.waitstatus_to_exitcode(status) != 0 or output[:1] != ["sent"]:
        raise RuntimeError(f"{name} failed: {' '.join(output)}")
    return Result(name, int(output[3]), wall, usage.ru_utime + usage.ru_stime, peak)


# The simulator's connection details, filled in by `_peer` for each peer's command line.
APNS_ARGS = ["{endpoint}", "{ca_file}", "{key_file}", "{key_id}", "{team_id}", "{topic}"]


def node_apn(count: int, workdir: Path) -> Result:
    """node-apn's driver sending `count` background notifications (bench/h2_floor.py too)."""
    return _peer("node-apn", ["node", str(HERE / "node_apn_driver.js"), str(count),
                              *APNS_ARGS], workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100_000, help="notifications per client")
    parser.add_argument("--dsn", help="a superuser DSN (default: $RELAY_TEST_DSN, else a "
                                      "private cluster)")
    args = parser.parse_args(argv)
    _install_peers()
    load = os.getloadavg()
    print(f"N = {args.n:,}  (load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})",
          flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="relay-peers-") as tmp:
        workdir = Path(tmp)
        results.append(node_apn(args.n, workdir))
        results.append(_peer("aioapns", [
            sys.executable, "-m", "bench.peers.aioapns_driver", "-n", str(args.n),
            *(f"--{key}={value}" for key, value in zip(
                ("endpoint", "ca-file", "key-file", "key-id", "team-id", "topic"),
                APNS_ARGS, strict=True))], workdir))
        relay_args = argparse.Namespace(senders=None, max_in_flight=None, mix=False,
                                        connections=1, processes=0, py_spy=None)
        with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_peers") as dsn:
            (workdir / "relay").mkdir()
            figures = run_wakeup(dsn, args.n, 0, relay_args, workdir / "relay")
        results.append(Result("relay (durable)", figures.outcomes, figures.wall,
                              figures.relay_cpu, figures.peak_rss))
    return _report(results)


def _report(results: list[Result]) -> int:
    print(f"\n{'client':<16} {'notifications/s':>15} {'CPU us/notif.':>14} {'peak RSS':>9}")
    for r in results:
        print(f"{r.name:<16} {r.rate:>15,.0f} {r.cpu_us:>14.0f} {r.peak_rss / 2**20:>6.1f} MB")
    node, aio, relay = results
    cpu_ratio, rate_ratio = relay.cpu_us / node.cpu_us, relay.rate / aio.rate
    cpu_met, rate_met = cpu_ratio <= TARGET_CPU_RATIO, rate_ratio >= TARGET_RATE_RATIO
    print(f"relay CPU per durable notification / node-apn's: {cpu_ratio:.2f}x "
          f"(target <= {TARGET_CPU_RATIO}: {'met' if cpu_met else 'NOT met'})")
    print(f"relay rate / aioapns': {rate_ratio:.2f}x "
          f"(target >= {TARGET_RATE_RATIO}: {'met' if rate_met else 'NOT met'})")
    print(f"relay rate / node-apn's: {relay.rate / node.rate:.2f}x; relay CPU / aioapns': "
          f"{relay.cpu_us / aio.cpu_us:.2f}x")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if cpu_met and rate_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
