"""The chaos soak: the relay as operators run it, under every small fault at once.

    python -m bench.chaos --minutes M --seed S [--relays N]

Starts a private PostgreSQL cluster, the APNs simulator (in this process, so its
faults are scripted directly) and N relay supervisors (default 1) as separate processes
sharing the database (relay/cluster.py), with short wakeup intervals, back-off and
leases. Registrations and unregistrations go through the HTTP API all along, to any of
them. At random intervals (seeded by --seed) one fault is injected:

* `kill -9` of a relay, or SIGTERM; either way it is started again at once;
* SIGSTOP of a relay for half to three times `cluster.lease_ttl`, then SIGCONT (a
  long GC pause, a VM stall): its leases lapse, another process takes its shards over;
* a PostgreSQL restart, or PostgreSQL stopped for up to 10 s;
* APNs: every connection dropped, GOAWAY on every connection, a burst of 503 or
  429 answers across tokens, or slow answers for a few seconds.

Afterwards the relay is stopped, one `relay wakeup` settles the run a last stop may
have left, and the log and the simulator are checked:

* every registration and unregistration the API answered 2xx for is in the log;
* every run started also finished;
* no token has more than one final outcome in a run;
* no outcome carries a lease epoch its shard had already left (fencing);
* sends the log does not account for (re-sent after a crash, a lost connection or a
  lost database session) stay within `wakeup.max_in_flight` per such disruption;
* `audit --verify` passes;
* no relay exited on its own other than for the database being away (3).

It prints the faults injected, runs, tokens, notifications and violations, and exits
0 only with no violation. The test suite runs a one-minute soak (tests/test_chaos.py).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import yaml

from events import types as ev
from events.audit import audit_main
from relay.database import EmbeddedPostgres, apply_migrations, with_dbname
from relay.simulator import ApnsSimulator, ScriptedOutcome, embedded_simulator

TOPIC = "org.example.chaos"
MAX_IN_FLIGHT = 50
DRAIN_TIMEOUT = 3.0
LEASE_TTL = 2.0
FREEZE = (0.5, 3.0)  # a SIGSTOP lasts this many lease_ttl, drawn uniformly
WAIT = 120.0
FAULT_GAP = (2.0, 8.0)  # seconds between faults, drawn uniformly
PG_STOP_MAX = 10.0
# Faults after which sends may be repeated without the log knowing of the first one.
DISRUPTIONS = ("kill -9", "SIGTERM", "SIGSTOP", "PostgreSQL restart", "PostgreSQL stop",
               "APNs drop", "APNs GOAWAY")
EXPECTED_EXITS = {0, 3, -signal.SIGKILL}
FINAL = (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_ABANDONED)
OUTCOMES = (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_FAILED, ev.NOTIFICATION_ABANDONED)


class Relay:
    """A supervisor as a process: started, killed, signalled, started again."""

    def __init__(self, config: Path, workdir: Path, name: str) -> None:
        self.config, self.workdir, self.name = config, workdir, name
        self.starts = 0
        self.own_exits: list[int] = []  # exit statuses nobody asked for
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *command: str) -> subprocess.Popen[bytes]:
        self.starts += 1
        with (self.workdir / f"{self.name}-{self.starts}.log").open("w") as sink:
            process = subprocess.Popen([sys.executable, "-m", "relay", "-c", str(self.config),
                                        *command], stdout=sink, stderr=subprocess.STDOUT)
        if not command:
            self.process = process
        return process

    def check(self) -> None:
        """Start it again if it ended by itself (and remember how it ended)."""
        if self.process is not None and self.process.poll() is not None:
            status = self.process.returncode
            if status not in EXPECTED_EXITS:
                print(f"  {self.name} exited on its own with status {status} "
                      f"({self.name}-{self.starts}.log)", flush=True)
            self.own_exits.append(status)
            self.start()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(WAIT)
        self.start()

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)

    def freeze(self, seconds: float) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.process.send_signal(signal.SIGCONT)


class Traffic:
    """Registers fresh tokens and unregisters some of them through the API, until stopped."""

    def __init__(self, base_urls: list[str], rng: random.Random) -> None:
        self.base_urls, self.rng = base_urls, rng
        self.registered: list[str] = []
        self.unregistered: list[str] = []
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="traffic", daemon=True)
        self._thread.start()

    def _request(self, method: str, path: str, body: dict[str, str] | None = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        base_url = self.rng.choice(self.base_urls)
        request = urllib.request.Request(f"{base_url}{path}", data=data, method=method,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return 0

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(0.02):
            n += 1
            if self.registered and n % 5 == 0:
                victim = self.rng.choice(self.registered)
                if self._request("DELETE", f"/devices/{victim}") // 100 == 2:
                    self.unregistered.append(victim)
                continue
            device = f"c{n:011x}{self.rng.getrandbits(208):052x}"
            status = self._request("POST", "/devices", {"token": device})
            if status // 100 == 2:
                self.registered.append(device)
            else:
                self.refused += 1
                if status == 0:
                    time.sleep(0.2)  # the relay is restarting

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)


class Chaos:
    def __init__(self, rng: random.Random, relays: list[Relay], cluster: EmbeddedPostgres,
                 simulator: ApnsSimulator) -> None:
        self.rng, self.relays, self.cluster, self.simulator = rng, relays, cluster, simulator
        self.injected: Counter[str] = Counter()

    def inject(self) -> None:
        kind = self.rng.choice(["kill -9", "SIGTERM", "SIGSTOP", "PostgreSQL restart",
                                "PostgreSQL stop", "APNs drop", "APNs GOAWAY", "APNs 503 burst",
                                "APNs 429 burst", "APNs slow answers"])
        relay = self.rng.choice(self.relays)
        self.injected[kind] += 1
        target = f" ({relay.name})" if kind in ("kill -9", "SIGTERM", "SIGSTOP") else ""
        print(f"  {time.strftime('%H:%M:%S')} {kind}{target}", flush=True)
        sim = self.simulator
        if kind == "kill -9":
            relay.kill()
        elif kind == "SIGTERM":
            status = relay.terminate()
            if status != 0:
                relay.own_exits.append(status)
                print(f"  SIGTERM: {relay.name} exited with status {status}", flush=True)
            relay.start()
        elif kind == "SIGSTOP":
            relay.freeze(self.rng.uniform(*FREEZE) * LEASE_TTL)
        elif kind == "PostgreSQL restart":
            self.cluster.stop()
            self.cluster.start()
        elif kind == "PostgreSQL stop":
            self.cluster.stop()
            time.sleep(self.rng.uniform(1.0, PG_STOP_MAX))
            self.cluster.start()
        elif kind == "APNs drop":
            sim.drop_connections()
        elif kind == "APNs GOAWAY":
            sim.send_goaway()
        elif kind == "APNs 503 burst":
            sim.burst([ScriptedOutcome(503, "ServiceUnavailable")] * self.rng.randint(5, 60))
        elif kind == "APNs 429 burst":
            sim.burst([ScriptedOutcome(429, "TooManyRequests")] * self.rng.randint(5, 60))
        else:
            sim.latency = self.rng.uniform(0.2, 3.0)
            threading.Timer(self.rng.uniform(1.0, 5.0), self._fast_again).start()

    def _fast_again(self) -> None:
        self.simulator.latency = 0.005


def write_config(workdir: Path, dsn: str, simulator: ApnsSimulator, apns: Any,
                 port: int) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    raw = {
        "database": {"dsn": dsn, "data_dir": str(workdir / "data")},
        "http": {"listen": f"127.0.0.1:{port}", "request_timeout": 2},
        "apns": {"endpoint": simulator.url, "ca_file": str(simulator.ca_file), "topic": TOPIC,
                 "key_file": str(apns.key_file), "key_id": apns.key_id,
                 "team_id": apns.team_id, "request_timeout": 4},
        "wakeup": {"interval": 5, "attempts": 5, "backoff_base": 0.5, "backoff_max": 2,
                   "max_in_flight": MAX_IN_FLIGHT, "breaker_pause": 2,
                   "drain_timeout": DRAIN_TIMEOUT, "progress_interval": 5},
        "cluster": {"lease_ttl": LEASE_TTL},
        "logging": {"level": "INFO"},
    }
    path = workdir / "relay.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check(dsn: str, traffic: Traffic, simulator: ApnsSimulator, disruptions: int,
          relays: list[Relay]) -> tuple[list[str], dict[str, int]]:
    """(violations, figures) from the log and the simulator."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT type, body FROM events ORDER BY position").fetchall()
    events = [(kind, json.loads(bytes(body))) for kind, body in rows]
    violations: list[str] = []

    registered = {d["token"] for kind, d in events if kind == ev.DEVICE_REGISTERED}
    missing = [t for t in traffic.registered if t not in registered]
    if missing:
        violations.append(f"{len(missing)} registrations answered 2xx are not in the log")
    unregistered = {d["token"] for kind, d in events if kind == ev.DEVICE_UNREGISTERED}
    missing = [t for t in traffic.unregistered if t not in unregistered]
    if missing:
        violations.append(f"{len(missing)} unregistrations answered 2xx are not in the log")

    started = {d["run"] for kind, d in events if kind == ev.RUN_STARTED}
    finished = {d["run"] for kind, d in events if kind == ev.RUN_FINISHED}
    if started - finished:
        violations.append(f"runs never finished: {sorted(started - finished)}")

    finals = Counter((d["run"], d["token"]) for kind, d in events if kind in FINAL or (
        kind == ev.NOTIFICATION_FAILED and d["verdict"] == "dead_token"))
    doubled = [key for key, n in finals.items() if n > 1]
    if doubled:
        violations.append(f"{len(doubled)} tokens have two final outcomes in a run "
                          f"(e.g. run {doubled[0][0]}, token {doubled[0][1]})")

    epoch: dict[int, int] = {}
    stale = 0
    for kind, d in events:
        if kind == ev.SHARD_LEASED:
            epoch[d["shard"]] = d["epoch"]
        elif kind in OUTCOMES and epoch.get(d.get("shard")) != d.get("epoch"):
            stale += 1
    if stale:
        violations.append(f"{stale} outcomes carry an epoch their shard had already left")

    answered = Counter(d["apns_id"] for kind, d in events
                       if kind in (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_FAILED))
    sent = Counter(r.header("apns-id") for r in simulator.requests if r.valid)
    resent = sum(max(0, n - answered[apns_id]) for apns_id, n in sent.items())
    if resent > MAX_IN_FLIGHT * max(1, disruptions):
        violations.append(f"{resent} sends the log does not account for, more than "
                          f"{MAX_IN_FLIGHT} per disruption ({disruptions})")
    if audit_main(dsn, ["--verify"]) != 0:
        violations.append("audit --verify failed")
    for relay in relays:
        unexpected = [s for s in relay.own_exits if s not in EXPECTED_EXITS]
        if unexpected:
            violations.append(f"{relay.name} exited on its own with {unexpected}")
    leased = sum(1 for kind, _ in events if kind == ev.SHARD_LEASED)
    figures = {"runs": len(finished), "tokens": len(registered),
               "notifications": sum(sent.values()), "resent": resent,
               "registrations refused (503 during outages)": traffic.refused,
               "relay starts": sum(relay.starts for relay in relays), "shards leased": leased}
    return violations, figures


def soak(minutes: float, seed: int, count: int = 1) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    workdir.chmod(0o755)
    cluster = EmbeddedPostgres(workdir / "pg")
    admin = cluster.start()
    simulator, apns = embedded_simulator(TOPIC, latency=0.005, log_requests=False)
    relays: list[Relay] = []
    keep = False
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "chaos"')
        dsn = with_dbname(admin, "chaos")
        apply_migrations(dsn)
        urls = []
        for i in range(count):
            port, name = _free_port(), f"relay{i}"
            config = write_config(workdir / name, dsn, simulator, apns, port)
            relays.append(Relay(config, workdir, name))
            urls.append(f"http://127.0.0.1:{port}")
        for relay in relays:
            relay.start()
        traffic = Traffic(urls, random.Random(rng.random()))
        chaos = Chaos(rng, relays, cluster, simulator)
        print(f"chaos soak: {minutes:g} min, seed {seed}, {count} relay(s), work directory "
              f"{workdir}", flush=True)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            pause_until = time.monotonic() + rng.uniform(*FAULT_GAP)
            while time.monotonic() < min(pause_until, end):
                for relay in relays:
                    relay.check()
                time.sleep(0.2)
            if time.monotonic() < end:
                chaos.inject()
        traffic.stop()
        simulator.latency = 0.005
        for relay in relays:
            relay.check()
            status = relay.terminate()
            if status != 0:
                relay.own_exits.append(status)
        # One `relay wakeup` finishes the run a stop may have left unfinished.
        settled = relays[0].start("wakeup").wait(WAIT)
        disruptions = sum(chaos.injected[k] for k in DISRUPTIONS)
        violations, figures = check(dsn, traffic, simulator, disruptions, relays)
        if settled != 0:
            violations.append(f"the settling `relay wakeup` exited with {settled}")
        print("faults injected: " + ", ".join(f"{k} {n}" for k, n in
                                              sorted(chaos.injected.items())))
        print(f"faults: {sum(chaos.injected.values())}, " +
              ", ".join(f"{k}: {v}" for k, v in figures.items()))
        print(f"re-sends per disruption: {figures['resent'] / max(1, disruptions):.1f} "
              f"(bound: wakeup.max_in_flight = {MAX_IN_FLIGHT})")
        for violation in violations:
            print(f"VIOLATION: {violation}")
        print(f"violations: {len(violations)}")
        keep = bool(violations)
        if keep:
            print(f"the relays' logs and the database stay in {workdir}")
        return 0 if not violations else 1
    finally:
        for relay in relays:
            if relay.process is not None and relay.process.poll() is None:
                relay.process.kill()
        simulator.stop()
        cluster.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--relays", type=int, default=1,
                        help="relay processes sharing the database (default 1)")
    args = parser.parse_args(argv)
    if args.relays < 1:
        parser.error("--relays must be at least 1")
    return soak(args.minutes, args.seed, args.relays)


if __name__ == "__main__":
    sys.exit(main())
