"""Throughput of the APNs client alone: N background notifications against the simulator.

The simulator runs in a child process (`python -m relay.simulator.cli`) so it does
not share the client's GIL; the figure is the client's, plus a loopback hop.

    python bench/apns_client.py                 # 20,000 distinct tokens, 1 connection
    python bench/apns_client.py -n 50000 --connections 2 --latency 5ms

Prints notifications/s (wall clock, first send to last answer) and the CPU
seconds the client process and the simulator process used. On a machine shared
with other work the wall-clock figure is bounded by whichever process gets less
CPU; notifications per client CPU-second is the client's own capacity per core.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.apns import ApnsClient
from relay.config import ApnsConfig
from relay.simulator.cli import spawn

TOPIC = "org.example.bench"


def start_simulator(workdir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str],
                                                                        ApnsConfig]:
    child, values = spawn(["--listen", "127.0.0.1:0", "--topic", TOPIC, "--generate-key",
                           "--quiet", "--workdir", str(workdir), "--latency", args.latency,
                           "--max-streams", str(args.max_streams)],
                          cwd=Path(__file__).resolve().parent.parent)
    config = ApnsConfig(
        endpoint=values["endpoint"], ca_file=Path(values["ca_file"]), topic=TOPIC,
        key_file=Path(values["key_file"]), key_id=values["key_id"], team_id=values["team_id"],
        connections=args.connections, request_timeout=120.0,
    )
    return child, config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="notifications (distinct tokens)")
    parser.add_argument("--connections", type=int, default=1, help="apns.connections")
    parser.add_argument("--latency", default="0", help="simulator answer delay, e.g. 5ms")
    parser.add_argument("--max-streams", type=int, default=1000, help="simulator stream limit")
    args = parser.parse_args()
    tokens = [os.urandom(32).hex() for _ in range(args.n)]
    ids = [str(uuid.uuid4()) for _ in range(args.n)]
    with tempfile.TemporaryDirectory(prefix="apns-bench-") as workdir:
        child, config = start_simulator(Path(workdir), args)
        client = ApnsClient(config, expiration=3600)
        client.start()
        try:
            client.send(tokens[0], ids[0]).result(30)  # connect, first 200 lifts the limit
            cpu0, wall0 = time.process_time(), time.perf_counter()
            futures = [client.send(t, i) for t, i in zip(tokens, ids, strict=True)]
            # One wake-up when all are done, as the relay's Senders (callbacks on the
            # client's thread) see it; blocking on each future in turn would wake this
            # thread 20,000 times and make it fight the client's thread for the GIL.
            concurrent.futures.wait(futures)
            results = [future.result() for future in futures]
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        finally:
            client.close()
            child.terminate()
            child.wait()
    outcomes = Counter(f"{r.status} {r.reason or ''}".strip() for r in results)
    simulator_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"notifications: {args.n}  connections: {args.connections}  "
          f"simulator latency: {args.latency}")
    print(f"outcomes: {dict(outcomes)}")
    print(f"notifications/s: {args.n / wall:,.0f}  (wall {wall:.2f} s)")
    print(f"client CPU seconds: {cpu:.2f}  ({cpu / args.n * 1e6:.0f} us per notification, "
          f"i.e. {args.n / cpu:,.0f} notifications per client CPU-second)")
    print(f"simulator CPU seconds (whole run): "
          f"{simulator_cpu.ru_utime + simulator_cpu.ru_stime:.2f}")
    return 0 if outcomes == Counter({"200": args.n}) else 1


if __name__ == "__main__":
    sys.exit(main())
