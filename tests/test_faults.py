"""Small faults stay small: each test injects one fault (a dropped connection, a reset
stream, a hostile answer, a lost wake-up) on the real simulator and real PostgreSQL and
checks that the run goes on without pausing all sending or burning attempts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import apns_fixtures
import psycopg
import pytest
import test_supervisor
import test_wakeup
from apns_fixtures import SimulatorFactory, running_client
from psycopg import conninfo
from test_wakeup import Relay

from actors import registry as registry_module
from actors.alarm import Alarm
from actors.breaker import BreakerState, CircuitBreaker
from actors.delivery import DeadVerdict
from actors.replies import ActorDied, ReplyBook
from events import types as ev
from events.journal import Journal, JournalStopped
from relay.apns import Verdict
from relay.apns.client import parse_error_body
from relay.apns.connection import Http2Connection
from relay.apns.processes import ApnsProcessPool
from relay.cluster import LeaseKeeper
from relay.config import ClusterConfig
from relay.exits import ExitStatus
from relay.simulator import ScriptedOutcome

WAIT = 30.0

simulator_factory = apns_fixtures.simulator_factory
relay = test_wakeup.relay


def token(i: int) -> str:
    return f"{i:064x}"


# --- 1. a dropped connection is the transport's fault -----------------------------------

def test_a_connection_dropped_with_streams_in_flight_neither_pauses_nor_costs_attempts(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    tokens = [token(i) for i in range(1, 1001)]
    relay.register(tokens)
    relay.simulator.latency = 0.05  # keeps the window full: dozens of streams in flight
    dropped: list[int] = []

    def drop_twice() -> None:
        for seen in (100, 500):
            assert relay.simulator.wait_for_requests(seen, timeout=WAIT)
            dropped.append(len(relay.simulator.requests) - seen)
            relay.simulator.drop_connections()

    dropper = threading.Thread(target=drop_twice, daemon=True)
    dropper.start()
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    result = relay.runner(max_in_flight=100, breaker_pause=60.0).run_once()
    took = time.monotonic() - started
    dropper.join(WAIT)
    assert len(dropped) == 2
    assert "lost with" in caplog.text, "no connection was dropped with streams in flight"
    lost = [int(r.getMessage().split(" lost with ")[1].split()[0]) for r in caplog.records
            if " lost with " in r.getMessage()]
    assert max(lost) >= 20, lost
    assert result.finished and (result.delivered, result.failed) == (1000, 0)
    assert took < 60.0, "the breaker paused the run"
    assert "pausing all sends" not in caplog.text
    failed = [d for _, kind, d in relay.events() if kind == ev.NOTIFICATION_FAILED]
    assert failed == [], "a lost connection cost a token an attempt"


def test_the_breaker_opens_on_apns_answers_across_tokens_not_on_lost_connections() -> None:
    now = [0.0]
    breaker = CircuitBreaker(60.0, trip_after=3, clock=lambda: now[0])
    for i in range(50):
        breaker.record(f"lost{i}", None, "ConnectionLost")
        breaker.record(f"reset{i}", None, "StreamReset")
        breaker.record(f"child{i}", None, "ChildProcessLost")
    assert breaker.state is BreakerState.CLOSED
    for i in range(3):
        breaker.record(f"busy{i}", 429, "TooManyRequests")
    assert breaker.state is BreakerState.OPEN
    now[0] = 61.0
    assert breaker.admit("probe")
    breaker.record("probe", None, "ConnectionLost")  # no verdict: another probe may go
    assert breaker.state is BreakerState.HALF_OPEN and breaker.admit("probe2")
    breaker.record("probe2", None, "Timeout")  # no connection at all: trouble
    assert breaker.state is BreakerState.OPEN


def test_a_burst_of_503_across_tokens_still_trips_the_breaker(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    tokens = [token(i) for i in range(1, 41)]
    relay.register(tokens)
    burst = 20
    relay.simulator.burst([ScriptedOutcome(503, "ServiceUnavailable")] * burst)
    caplog.set_level(logging.INFO, logger="actors.dispatcher")
    # More attempts than the burst has answers: however the burst's 503s fall on the tokens
    # (retries and probes interleave differently on a loaded machine), none is abandoned.
    result = relay.runner(breaker_pause=0.3, attempts=burst + 1, max_in_flight=5).run_once()
    assert result.finished and result.delivered == 40
    assert "pausing all sends" in caplog.text


# --- 2. every wake-up fires ---------------------------------------------------------------

def test_the_alarm_fires_for_every_deadline_not_only_the_earliest() -> None:
    fired: list[float] = []
    done = threading.Event()

    def fire() -> None:
        fired.append(time.monotonic())
        if len(fired) == 2:
            done.set()

    alarm = Alarm(fire, "test-alarm")
    alarm.start()
    try:
        start = time.monotonic()
        alarm.at(start + 0.05)  # the breaker's resume, say
        alarm.at(start + 0.3)  # a database retry due later: it used to be forgotten
        alarm.at(start + 0.3)  # asked again: still one wake-up
        assert done.wait(WAIT)
        assert fired[0] - start >= 0.05 and fired[1] - start >= 0.3
        assert alarm.pending == 0
    finally:
        alarm.stop()


# --- hostile answers --------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["1e400", "Infinity", "-Infinity", "NaN", "1e300",
                                 "99999999999999999999999", "-5"])
def test_a_410_timestamp_that_is_no_time_is_absent_and_logged(
        raw: str, caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"reason": "Unregistered", "timestamp": ' + raw.encode() + b"}"
    with caplog.at_level(logging.WARNING, logger="relay.apns"):
        assert parse_error_body(body) == ("Unregistered", None)
    assert "not a time" in caplog.text


def test_a_hostile_410_timestamp_on_the_wire_keeps_the_connection_up(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    hostile = [1e400, float("nan"), 10.0**30]
    for n, value in enumerate(hostile, start=1):
        simulator.script(token(n), [ScriptedOutcome(410, "Unregistered", value)])  # type: ignore[arg-type]
    with running_client(config) as client:
        results = [client.send(token(n), f"00000000-0000-4000-8000-{n:012x}").result(WAIT)
                   for n in range(1, len(hostile) + 2)]
    assert [(r.status, r.verdict, r.timestamp_ms) for r in results[:-1]] == [
        (410, Verdict.DEAD_TOKEN, None)] * len(hostile)
    assert results[-1].status == 200
    assert simulator.connections_opened == 1


def test_a_connection_at_the_end_of_its_stream_ids_is_replaced_with_nothing_failed(
        simulator_factory: SimulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    simulator, config = simulator_factory(latency=0.01)
    monkeypatch.setattr(Http2Connection, "last_stream_id", 41)  # 20 streams per connection
    with running_client(config) as client:
        futures = [client.send(token(n), f"00000000-0000-4000-8000-{n:012x}")
                   for n in range(1, 201)]
        results = [f.result(WAIT) for f in futures]
    assert Counter(r.status for r in results) == {200: 200}
    assert simulator.connections_opened >= 10
    assert max(r.stream_id for r in simulator.requests) <= 41


# --- 4. a crashed actor's replies are failed, and the run goes on -----------------------

def test_a_registry_crash_mid_run_fails_its_replies_and_the_run_finishes(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [token(i) for i in range(1, 201)]
    dead = tokens[10:20]
    relay.register(tokens)
    for t in dead:
        relay.simulator.script(t, [ScriptedOutcome(410, "Unregistered")])
    crashed = threading.Event()

    def crash(*args: object, **kwargs: object) -> None:
        crashed.set()
        raise RuntimeError("injected: the registry crashes on a dead token")

    monkeypatch.setattr(registry_module.Registry, "_dead", crash)
    outcome = test_wakeup._run_in_thread(relay.runner(max_in_flight=20))
    result = outcome.result(WAIT)  # stalled forever when the crash swallowed the replies
    assert crashed.is_set() and not relay.registry.alive()
    assert result.finished and result.delivered == len(tokens) - len(dead)
    assert result.dead == len(dead)
    # Replies owed by the dead actor were failed, not forgotten; a restart serves again.
    failed = relay.registry.dead_token(DeadVerdict(dead[0], "Unregistered", 0, None, 1, None))
    assert isinstance(failed.exception(WAIT), RuntimeError)
    monkeypatch.undo()
    relay.registry.restart()
    relay.registry.register(token(999)).result(WAIT)


def test_a_reply_book_fails_what_its_dead_actor_owes_and_everything_after() -> None:
    book = ReplyBook("the test actor")
    owed: Future[None] = Future()
    answered: Future[None] = Future()
    book.track(owed)
    book.track(answered)
    answered.set_result(None)
    assert book.owed == 1
    book.close("crashed: boom")
    late: Future[None] = Future()
    book.track(late)
    assert isinstance(owed.exception(0), ActorDied) and "boom" in str(owed.exception(0))
    assert isinstance(late.exception(0), ActorDied)
    assert answered.result(0) is None


# --- 5. a child process that keeps dying ends the relay ------------------------------------

def test_a_crash_looping_sender_process_ends_the_relay_by_the_restart_budget(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    simulator, apns = simulator_factory()
    supervise = test_supervisor.Supervise(dsn, simulator, dataclasses.replace(apns, processes=1),
                                          tmp_path)
    try:
        running = supervise()
        pool = running.supervisor.parts.client
        assert isinstance(pool, ApnsProcessPool)
        kills = 0
        deadline = time.monotonic() + WAIT
        while not running.status.done():
            assert time.monotonic() < deadline, "the crash loop never ended"
            child = pool._children[0]
            if child.alive and child.process is not None and child.process.is_alive():
                os.kill(child.process.pid, signal.SIGKILL)
                kills += 1
                while pool.alive() and not running.status.done():
                    time.sleep(0.01)
            time.sleep(0.01)
        assert running.status.result(WAIT) == ExitStatus.FAILURE
        assert kills == test_supervisor.FAST.max_restarts + 1
        [critical] = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
        assert "an APNs sender process" in critical and "exit code -9" in critical
        assert "exiting so that the service manager restarts the relay" in critical
    finally:
        supervise.close()


# --- a lease holder cut off from the database ------------------------------------------------

class FreezableProxy:
    """TCP in front of PostgreSQL (TCP or Unix socket) that can go silent without closing:
    what a holder behind a dead network path sees."""

    def __init__(self, dsn: str) -> None:
        options = conninfo.conninfo_to_dict(dsn)
        host, port = str(options.get("host") or "localhost"), int(options.get("port") or 5432)
        self._upstream: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/")
            else (socket.AF_INET, (host, port)))
        self.frozen = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = conninfo.make_conninfo(dsn, host="127.0.0.1",
                                          port=self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            family, address = self._upstream
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(address)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)


def test_a_lease_holder_cut_off_from_the_database_stops_driving_its_shards_within_the_lease(
        dsn: str) -> None:
    """Its renewals go unanswered: by its own clock, started before each renewal was sent,
    its leases run out no later than the database's (after which another process may take
    the shards over), and it drives nothing from then on."""
    proxy = FreezableProxy(dsn)
    keeper = LeaseKeeper(proxy.dsn, ClusterConfig(shards=4, lease_ttl=1.5))
    keeper.start()
    try:
        assert set(keeper.leases().held) == {0, 1, 2, 3}
        proxy.frozen.set()
        frozen_at = time.monotonic()
        while keeper.leases().valid:
            assert time.monotonic() - frozen_at < 1.5 + 0.2, "still driving past its lease"
            time.sleep(0.05)
    finally:
        proxy.frozen.clear()
        keeper.stop()


# --- an ambiguous COMMIT at shutdown --------------------------------------------------------

@pytest.mark.parametrize("committed", [True, False])
def test_a_commit_in_doubt_at_shutdown_is_fate_unknown_then_settled_at_the_next_start(
        dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, committed: bool) -> None:
    unsettled = tmp_path / "unsettled-batches"
    real_write = Journal._write
    attempts: list[int] = []

    def lost_answer(self: Journal, batch: Any, batch_id: Any, retrying: bool) -> int:
        """The COMMIT goes out (and, if `committed`, succeeds); its answer never comes back,
        and the database stays away until the Journal's stop deadline."""
        attempts.append(1)
        if len(attempts) == 1:
            if committed:
                real_write(self, batch, batch_id, retrying)
            self._commit_sent = True
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(Journal, "_write", lost_answer)
    journal = Journal(dsn, unsettled=unsettled)
    journal.start()
    appended = journal.append([ev.device_registered(token(77), ev.now_ms())])
    while not attempts:
        time.sleep(0.01)
    caplog.set_level(logging.WARNING, logger="events.journal")
    journal.stop(timeout=0.3)
    error = appended.exception(WAIT)
    assert isinstance(error, JournalStopped)
    assert "fate unknown" in str(error) and "settled at the next start" in str(error)
    assert "not in the log" not in str(error)
    assert unsettled.exists()

    monkeypatch.undo()
    caplog.clear()
    again = Journal(dsn, unsettled=unsettled)
    again.start()
    again.stop(timeout=5)
    settled = [r.getMessage() for r in caplog.records if "whose fate was unknown" in r.getMessage()]
    assert len(settled) == 1
    assert ("had committed" if committed else "did not commit") in settled[0]
    assert not unsettled.exists()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM events WHERE token = %s", (token(77),)).fetchone()
    assert rows == ((1,) if committed else (0,))


def test_a_batch_that_never_reached_commit_is_said_not_to_be_in_the_log(
        dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(self: Journal, *args: Any) -> int:
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(Journal, "_write", unreachable)
    journal = Journal(dsn, unsettled=tmp_path / "unsettled-batches")
    journal.start()
    appended = journal.append([ev.device_registered(token(78), ev.now_ms())])
    time.sleep(0.1)
    journal.stop(timeout=0.2)
    error = appended.exception(WAIT)
    assert isinstance(error, JournalStopped) and "not in the log" in str(error)
    assert not (tmp_path / "unsettled-batches").exists()


# --- a take-up after a drain that timed out ------------------------------------------------

def test_a_take_up_waits_for_outcomes_still_in_the_journal_so_no_token_gets_two(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain that times out (a stop during a database outage, say) leaves
    outcomes queued in the Journal; the next take-up must not read the log before them."""
    tokens = [token(i) for i in range(1, 401)]
    relay.register(tokens)
    relay.simulator.latency = 0.002
    stalled, gate = threading.Event(), threading.Event()
    real_write = Journal._write

    def slow_database(self: Journal, *args: Any) -> int:
        if stalled.is_set():
            gate.wait(WAIT)
        return real_write(self, *args)

    monkeypatch.setattr(Journal, "_write", slow_database)
    first = relay.runner(max_in_flight=40, drain_timeout=0.0)
    outcome = test_wakeup._run_in_thread(first)
    assert relay.simulator.wait_for_requests(100, timeout=WAIT)
    stalled.set()  # outcomes decided from now on wait in the Journal
    time.sleep(0.2)
    first.request_stop()
    assert not outcome.result(WAIT).drained

    second = test_wakeup._run_in_thread(relay.runner(max_in_flight=40))
    time.sleep(0.5)
    assert not second.done(), "took the run up before the Journal had settled"
    gate.set()
    resumed = second.result(WAIT)
    assert resumed.resumed and resumed.finished
    finals = test_wakeup._finals(relay.events(), resumed.run)
    assert finals == Counter(tokens), "a token has two final outcomes in the run"
