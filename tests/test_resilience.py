"""Surviving failure, as operators meet it: the relay as a real process, killed, signalled,
halted, and its PostgreSQL restarted under it, against the simulator over real TLS."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apns_fixtures
import psycopg
import pytest
import relay_fixtures
from apns_fixtures import SimulatorFactory, token
from relay_fixtures import (
    WAIT,
    RelayProcess,
    api_request,
    finals,
    free_port,
    register,
    start_relay,
    wait_healthy,
    write_config,
)
from relay_fixtures import events as read_events

from events import types as ev
from events.audit import audit_main
from relay.cluster import token_point
from relay.database import EmbeddedPostgres, apply_migrations, with_dbname
from relay.simulator import ScriptedOutcome

simulator_factory = apns_fixtures.simulator_factory
processes = relay_fixtures.processes


def _wait_run_finished(dsn: str, run: int, relay: RelayProcess) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert relay.process.poll() is None, relay.log
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                row = conn.execute("SELECT body FROM events WHERE type = 'run_finished' "
                                   "AND run = %s", (run,)).fetchone()
        except psycopg.OperationalError:
            row = None
        if row is not None:
            finished: dict[str, Any] = json.loads(bytes(row[0]))
            return finished
        time.sleep(0.1)
    raise AssertionError(f"run {run} never finished:\n{relay.log}")


def _active(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {row[0] for row in conn.execute("SELECT token FROM devices WHERE active")}


class Registrar:
    """Registers fresh tokens through the API, one after another, until stopped."""

    def __init__(self, base_url: str, prefix: str) -> None:
        self.base_url, self.prefix = base_url, prefix
        self.accepted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registrar", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            device = f"{self.prefix}{n:08x}".ljust(64, "0")
            try:
                status, _ = api_request(f"{self.base_url}/devices", "POST", {"token": device})
            except (urllib.error.URLError, ConnectionError, OSError):
                return  # the relay is gone
            if 200 <= status < 300:
                self.accepted.append(device)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(WAIT)
        return self.accepted


# --- kill -9 ------------------------------------------------------------------------------

def test_kill_9_mid_run_then_a_restart_finishes_the_run_without_losing_anything(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    simulator, apns = simulator_factory(latency=0.02)
    tokens = [token(i) for i in range(1, 5001)]
    # Sent some 500 requests before the kill, so recorded by then, and due 3 s after failing:
    # in back-off when the process dies, at any send rate above 170/s.
    sick = sorted(tokens, key=lambda t: (token_point(t), t))[1000:1003]  # in sending order
    for t in sick:
        simulator.script(t, ScriptedOutcome.failures(1, 503, "ServiceUnavailable"))
    register(dsn, tokens)
    port, window = free_port(), 50
    config = write_config(tmp_path, dsn, apns, port, max_in_flight=window, attempts=3,
                          backoff_base=3, backoff_max=3)
    base_url = f"http://127.0.0.1:{port}"

    first = start_relay(processes, config, name="first")
    wait_healthy(base_url, first)
    registrar = Registrar(base_url, "ab")
    assert simulator.wait_for_requests(1500, timeout=WAIT)
    first.kill()
    accepted = registrar.stop()
    before = read_events(dsn)
    assert ev.RUN_FINISHED not in {kind for kind, _ in before}, "killed after the run ended"
    assert accepted, "no registration went through the API during the run"

    second = start_relay(processes, config, name="second")
    finished = _wait_run_finished(dsn, 1, second)
    second.signal(signal.SIGTERM)
    assert second.finish() == 0, second.log

    events = read_events(dsn)
    outcomes = finals(events, 1)
    assert set(tokens) <= set(outcomes)
    assert set(outcomes.values()) == {1}, "a token has two final outcomes in the run"
    assert finished["tokens"] == len(outcomes) and finished["delivered"] == len(outcomes)
    assert [d["run"] for kind, d in events if kind == ev.RUN_STARTED] == [1]

    sent = Counter(r.token for r in simulator.requests)
    resent = [t for t, n in sent.items() if n > 1 and t not in sick]
    assert len(resent) <= window
    assert max(sent.values()) <= 2
    # Tokens in back-off kept their schedule: failed before the kill, retried by the second
    # process no earlier than the time the first one logged.
    failed_before_kill = {d["token"] for kind, d in before if kind == ev.NOTIFICATION_FAILED}
    delivered_before_kill = {d["token"] for kind, d in before
                             if kind == ev.NOTIFICATION_DELIVERED}
    assert set(sick) <= failed_before_kill and not set(sick) & delivered_before_kill
    for t in sick:
        mine = [(kind, d) for kind, d in events if d.get("token") == t and d.get("run") == 1]
        [failed] = [d for kind, d in mine if kind == ev.NOTIFICATION_FAILED]
        [delivered] = [d for kind, d in mine if kind == ev.NOTIFICATION_DELIVERED]
        assert delivered["attempt"] == 2 and delivered["apns_id"] == failed["apns_id"]
        assert ev.parse_iso_ms(delivered["at"]) >= ev.parse_iso_ms(failed["next_attempt_at"])
    # No registration is lost: the seeded ones and every one the API answered 2xx for.
    assert set(tokens) | set(accepted) <= _active(dsn)
    assert "/5000 tokens done" in first.log and "tokens/s, ETA" in first.log

    assert audit_main(dsn, ["--verify"]) == 0, "the chain or the cached tables are damaged"


# --- one run at a time ---------------------------------------------------------------------

def test_a_wakeup_started_beside_a_running_supervisor_joins_its_run(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    """One run at a time, cluster-wide: `relay wakeup` takes up the run in progress (the
    shards the supervisor gives it), and exits once that run is finished; nothing is sent
    twice."""
    simulator, apns = simulator_factory()
    tokens = [token(i) for i in range(1, 201)]
    sick = tokens[0]  # in back-off for 3 s: the supervisor's run lasts at least that long
    simulator.script(sick, ScriptedOutcome.failures(1, 503, "ServiceUnavailable"))
    register(dsn, tokens)
    config = write_config(tmp_path, dsn, apns, free_port(), backoff_base=3, backoff_max=3)
    supervisor = start_relay(processes, config, name="supervisor")
    assert simulator.wait_for_requests(len(tokens), timeout=WAIT)
    wakeup = start_relay(processes, config, "wakeup", name="wakeup")
    assert wakeup.finish() == 0, wakeup.log
    supervisor.signal(signal.SIGTERM)
    assert supervisor.finish() == 0, supervisor.log

    events = read_events(dsn)
    marks = [(kind, d["run"]) for kind, d in events if kind in (ev.RUN_STARTED, ev.RUN_FINISHED)]
    assert marks == [(ev.RUN_STARTED, 1), (ev.RUN_FINISHED, 1)]
    assert finals(events, 1) == Counter(tokens)
    assert Counter(r.token for r in simulator.requests) == Counter([*tokens, sick])
    assert "taking up unfinished run 1" in wakeup.log


# --- PostgreSQL restarted under a running relay -------------------------------------------

class Cluster:
    """A PostgreSQL of this module's own, which its tests stop and start (as an unprivileged
    user when we are root: its directory must be reachable for that user)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="relay-outage-pg-"))
        self.directory.chmod(0o755)
        self._server = EmbeddedPostgres(self.directory)
        self.dsn = self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        self._server.start()

    def running(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.fixture
def outage_dsn(private_cluster: Cluster) -> str:
    """A fresh database with every migration applied, on the cluster that tests stop."""
    if not private_cluster.running():  # an earlier test failed during its outage
        private_cluster.start()
    name = f"relay_outage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(private_cluster.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = with_dbname(private_cluster.dsn, name)
    apply_migrations(dsn)
    return dsn


def test_a_postgresql_restart_mid_run_loses_nothing(
        private_cluster: Cluster, outage_dsn: str, simulator_factory: SimulatorFactory,
        tmp_path: Path, processes: list[RelayProcess]) -> None:
    dsn = outage_dsn
    simulator, apns = simulator_factory(latency=0.1)
    tokens = [token(i) for i in range(1, 1001)]
    register(dsn, tokens)
    port = free_port()
    config = write_config(tmp_path, dsn, apns, port, max_in_flight=50)
    base_url = f"http://127.0.0.1:{port}"
    relay = start_relay(processes, config)
    wait_healthy(base_url, relay)
    assert simulator.wait_for_requests(200, timeout=WAIT)

    private_cluster.stop()
    outage_answers: list[tuple[int, dict[str, str]]] = []
    health: list[int] = []
    for n in range(6):
        outage_answers.append(api_request(f"{base_url}/devices", "POST",
                                          {"token": token(900_000 + n)}))
        health.append(api_request(f"{base_url}/health")[0])
    assert relay.process.poll() is None, relay.log
    during = len(simulator.requests)
    private_cluster.start()

    assert all(status == 503 for status, _ in outage_answers), (outage_answers, relay.log)
    assert all(int(headers["Retry-After"]) > 0 for _, headers in outage_answers)
    assert health[-1] == 503, (health, relay.log)
    assert during < len(tokens), f"the run ended before the outage:\n{relay.log}"
    finished = _wait_run_finished(dsn, 1, relay)
    late = token(999_999)
    deadline = time.monotonic() + WAIT
    while api_request(f"{base_url}/devices", "POST", {"token": late})[0] != 200:
        assert time.monotonic() < deadline, relay.log
        time.sleep(0.2)
    relay.signal(signal.SIGTERM)
    assert relay.finish() == 0, relay.log

    events = read_events(dsn)
    assert finals(events, 1) == Counter(tokens), relay.log
    assert (finished["tokens"], finished["delivered"]) == (len(tokens), len(tokens))
    assert Counter(r.token for r in simulator.requests) == Counter(tokens), relay.log
    assert set(tokens) | {late} <= _active(dsn)
    pauses = [float(p) for p in re.findall(r"retrying in (\d+(?:\.\d+)?) ?s", relay.log)]
    assert pauses and all(0.4 <= p <= 30.0 for p in pauses), pauses


def test_postgresql_stopped_between_runs_turns_health_503_within_5s_and_200_after(
        private_cluster: Cluster, outage_dsn: str, simulator_factory: SimulatorFactory,
        tmp_path: Path, processes: list[RelayProcess]) -> None:
    """Nothing is written between runs: the Journal's idle probe is what notices."""
    _, apns = simulator_factory()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    relay = start_relay(processes, write_config(tmp_path, outage_dsn, apns, port))
    wait_healthy(base_url, relay)  # the start-up run (no tokens) is over: idle from here

    private_cluster.stop()
    stopped = time.monotonic()
    while api_request(f"{base_url}/health")[0] != 503:
        assert time.monotonic() - stopped < 5.0, relay.log
        time.sleep(0.05)
    assert relay.process.poll() is None, relay.log

    private_cluster.start()
    wait_healthy(base_url, relay)
    assert api_request(f"{base_url}/devices", "POST", {"token": token(1)})[0] == 200
    relay.signal(signal.SIGTERM)
    assert relay.finish() == 0, relay.log


def test_a_signal_while_the_database_is_away_still_exits_0_within_the_drain_timeout(
        private_cluster: Cluster, outage_dsn: str, simulator_factory: SimulatorFactory,
        tmp_path: Path, processes: list[RelayProcess]) -> None:
    dsn = outage_dsn
    simulator, apns = simulator_factory(latency=0.05)
    tokens = [token(i) for i in range(1, 401)]
    register(dsn, tokens)
    drain_timeout = 2.0
    config = write_config(tmp_path, dsn, apns, free_port(), max_in_flight=40,
                          drain_timeout=drain_timeout)
    relay = start_relay(processes, config, "wakeup")
    assert simulator.wait_for_requests(100, timeout=WAIT)
    private_cluster.stop()  # the sends answered from now on cannot be recorded
    signalled = time.monotonic()
    relay.signal(signal.SIGTERM)
    assert relay.finish() == 0, relay.log
    elapsed = time.monotonic() - signalled
    # The process arms a hard exit at the timeout (without it the Journal would retry the
    # lost database for 30 s); the slack covers process exit and this test's scheduling.
    assert elapsed < drain_timeout + 1.0, (elapsed, relay.log)

    private_cluster.start()
    again = start_relay(processes, config, "wakeup", name="again")
    assert again.finish() == 0, again.log
    assert finals(read_events(dsn), 1) == Counter(tokens)


# --- signals: drain, record, exit 0 -------------------------------------------------------

def test_sigint_mid_run_drains_records_the_sends_and_exits_0(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    """SIGINT to the supervisor here; SIGTERM to `relay wakeup` in the database outage test."""
    simulator, apns = simulator_factory(latency=0.1)
    tokens = [token(i) for i in range(1, 3001)]
    register(dsn, tokens)
    drain_timeout = 10.0
    config = write_config(tmp_path, dsn, apns, free_port(), max_in_flight=100,
                          drain_timeout=drain_timeout)
    relay = start_relay(processes, config)
    assert simulator.wait_for_requests(300, timeout=WAIT)
    signalled = time.monotonic()
    relay.signal(signal.SIGINT)
    assert relay.finish(timeout=drain_timeout) == 0, relay.log
    assert time.monotonic() - signalled < drain_timeout

    events = read_events(dsn)
    delivered = Counter(d["token"] for kind, d in events if kind == ev.NOTIFICATION_DELIVERED)
    assert delivered == Counter(r.token for r in simulator.requests), \
        "every send made before the exit is recorded"
    assert 300 <= sum(delivered.values()) < len(tokens)
    assert ev.RUN_FINISHED not in {kind for kind, _ in events}, "the run is left to resume"
    assert "draining in-flight sends" in relay.log


# --- halts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [("wakeup",), ()], ids=["wakeup", "supervisor"])
def test_invalid_provider_token_ends_the_process_with_status_9_after_relay_halted(
        command: tuple[str, ...], dsn: str, simulator_factory: SimulatorFactory,
        tmp_path: Path, processes: list[RelayProcess]) -> None:
    simulator, apns = simulator_factory()
    tokens = [token(i) for i in range(1, 101)]
    simulator.script(tokens[49], [ScriptedOutcome(403, "InvalidProviderToken")])
    register(dsn, tokens)
    config = write_config(tmp_path, dsn, apns, free_port())
    relay = start_relay(processes, config, *command)
    assert relay.finish() == 9, relay.log
    halted = [d for kind, d in read_events(dsn) if kind == ev.RELAY_HALTED]
    assert len(halted) == 1
    assert (halted[0]["halt_class"], halted[0]["reason"]) == ("configuration",
                                                              "InvalidProviderToken")
    assert "HALTED (configuration): APNs answered 403 InvalidProviderToken" in relay.log
    assert "Check apns.topic" in relay.log


# --- progress on a terminal ---------------------------------------------------------------

def _read_all(fd: int, process: subprocess.Popen[bytes]) -> str:
    """Everything written to a pty until the process exits and the pty runs dry."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


def test_wakeup_on_a_terminal_shows_a_progress_bar(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    simulator, apns = simulator_factory()
    tokens = [token(i) for i in range(1, 301)]
    register(dsn, tokens)
    config = write_config(tmp_path, dsn, apns, free_port())
    controller, terminal = pty.openpty()
    # A terminal of 24 rows and 100 columns (a fresh pty has none, and tqdm draws to the width).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "relay", "-c", str(config), "wakeup"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=terminal)
    os.close(terminal)
    try:
        screen = _read_all(controller, process)
        assert process.wait(WAIT) == 0, screen
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert "wakeup: 100%" in screen and "300/300" in screen, screen
    assert "token/s" in screen
    assert Counter(r.token for r in simulator.requests) == Counter(tokens)
