"""Audit replay speed of two checkouts on one log: `audit --verify`'s replay, alternating.

    python -m bench.replay_ab --before PATH --after PATH [--dsn SUPERUSER_DSN]
                              [--events 200000] [--rounds 6]

Seeds one scratch database with `bench.replay.realistic_log` (this checkout's format,
schema and writer), vacuums and checkpoints it, then times `events.replay.replay(conn,
verify=True)` in a fresh process of each checkout in turn (PYTHONPATH and working
directory set to it), `--rounds` times, so that both see the same machine load. Prints
every time, the minimum and the median, and after/before ratios. Both checkouts must be
able to read this checkout's schema (a newer one adds columns, never removes them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from bench.journal import migrated_database, server
from bench.replay import realistic_log, settle
from events.batch_sql import append_bulk

TIMED = (
    "import sys, time\n"
    "try:\n"
    "    from events.replay import read_only_snapshot, replay\n"
    "except ImportError:  # a checkout from before events/replay.py\n"
    "    from events.audit import _read_only_snapshot as read_only_snapshot, replay\n"
    "from relay.database import connect\n"
    "with connect(sys.argv[1]) as conn:\n"
    "    read_only_snapshot(conn)\n"
    "    start = time.perf_counter()\n"
    "    result = replay(conn, verify=True)\n"
    "    print(time.perf_counter() - start, result.chain_problem_count)\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="checkout directory timed first")
    parser.add_argument("--after", required=True, help="checkout directory timed second")
    parser.add_argument("--dsn", help="a superuser DSN (a scratch database is created)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    checkouts = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    with server(args.dsn) as admin_dsn, migrated_database(admin_dsn, "bench_ab") as dsn:
        append_bulk(dsn, realistic_log(args.events, max(1, args.events // 10)))
        settle(dsn)
        for _ in range(args.rounds):
            for name, path in checkouts.items():
                done = subprocess.run(
                    [sys.executable, "-c", TIMED, dsn], capture_output=True, text=True,
                    cwd=path, env={**os.environ, "PYTHONPATH": path}, check=True)
                seconds, problems = done.stdout.split()
                assert problems == "0", f"{name} found problems in a sound log"
                times[name].append(float(seconds))
    for name, values in times.items():
        print(f"{name:6} {checkouts[name]}: " + " ".join(f"{v:.2f}" for v in values)
              + f"  min {min(values):.2f} s, median {statistics.median(values):.2f} s")
    print(f"after/before: min {min(times['after']) / min(times['before']):.2f}, median "
          f"{statistics.median(times['after']) / statistics.median(times['before']):.2f} "
          f"({args.events:,} events, load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
