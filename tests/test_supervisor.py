"""The supervisor: restarts with back-off, escalation, runs one at a time and each recorded.

Real PostgreSQL, the simulator over TLS, real actors; crashes are injected into the
real Registry and Sender shard actors (pykka stops an actor whose `on_receive` raises).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import apns_fixtures
import psycopg
import pytest
from apns_fixtures import SimulatorFactory, token
from relay_fixtures import events as read_events
from relay_fixtures import register

from actors.registry import Registry
from actors.sender import SenderShard
from events import types as ev
from events.journal import Journal
from relay import supervisor as supervisor_module
from relay.cluster import ClusterLog
from relay.config import ApnsConfig, Config, DatabaseConfig, HttpConfig, WakeupConfig
from relay.exits import ExitStatus
from relay.simulator import ApnsSimulator
from relay.supervisor import RestartBudget, RestartPolicy, Supervisor

simulator_factory = apns_fixtures.simulator_factory

WAIT = 30.0
FAST = RestartPolicy(max_restarts=3, window=60.0, backoff=0.2, check_every=0.05)


class Running:
    """A Supervisor serving on its own thread; `finish()` stops it and gives its status."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.status: Future[int] = Future()
        threading.Thread(target=self._serve, name="test-supervisor", daemon=True).start()

    def _serve(self) -> None:
        try:
            self.status.set_result(self.supervisor.run())
        except BaseException as exc:
            self.status.set_exception(exc)

    def finish(self) -> int:
        self.supervisor.stop()
        return self.status.result(WAIT)


class Supervise:
    """Starts Supervisors over real parts on this test's database and simulator."""

    def __init__(self, dsn: str, simulator: ApnsSimulator, apns: ApnsConfig,
                 data_dir: Path) -> None:
        self.dsn, self.simulator, self.apns, self.data_dir = dsn, simulator, apns, data_dir
        self._parts = contextlib.ExitStack()

    def __call__(self, policy: RestartPolicy = FAST, **wakeup: Any) -> Running:
        settings = {"backoff_base": 0.05, "backoff_max": 0.2, **wakeup}
        config = Config(database=DatabaseConfig(dsn=self.dsn, data_dir=self.data_dir),
                        http=HttpConfig(listen=("127.0.0.1", 0)), apns=self.apns,
                        wakeup=WakeupConfig(**settings))
        supervisor = Supervisor(config, self.dsn, policy)
        self._parts.enter_context(supervisor.running(serve=True))
        return Running(supervisor)

    def close(self) -> None:
        self._parts.close()


@pytest.fixture
def supervise(dsn: str, simulator_factory: SimulatorFactory,
              tmp_path: Path) -> Iterator[Supervise]:
    simulator, apns = simulator_factory()
    starter = Supervise(dsn, simulator, apns, tmp_path)
    yield starter
    starter.close()


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _crash_unregistrations(monkeypatch: pytest.MonkeyPatch, times: int) -> list[float]:
    """The next `times` unregistrations crash the Registry actor (registrations never pass
    through it); returns when each did."""
    crashes: list[float] = []
    original = Registry._take

    def crashing(self: Registry, request: Any) -> None:
        if len(crashes) < times:
            crashes.append(time.monotonic())
            raise RuntimeError("injected Registry crash")
        original(self, request)

    monkeypatch.setattr(Registry, "_take", crashing)
    return crashes


def test_restart_budget_doubles_the_pause_and_runs_out_within_the_window() -> None:
    now = [0.0]
    budget = RestartBudget(RestartPolicy(max_restarts=3, window=10.0, backoff=0.5),
                           clock=lambda: now[0])
    assert [budget.next_pause(), budget.next_pause(), budget.next_pause()] == [0.5, 1.0, 2.0]
    assert budget.next_pause() is None
    now[0] = 10.0  # the first restarts have left the window
    assert budget.next_pause() == 0.5


def test_a_crashed_registry_is_restarted_after_a_back_off(
        supervise: Supervise, dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.supervisor")
    running = supervise()
    registry = running.supervisor.parts.registry
    crashes = _crash_unregistrations(monkeypatch, times=1)
    registry.unregister(token(1))
    _until(lambda: crashes and not registry.alive(), "the crash")
    _until(registry.alive, "the restart")
    restarted = time.monotonic()
    registry.register(token(2)).result(WAIT)

    assert restarted - crashes[0] >= FAST.backoff
    assert running.finish() == ExitStatus.OK
    registered = [d["token"] for kind, d in read_events(dsn) if kind == ev.DEVICE_REGISTERED]
    assert registered == [token(2)]
    assert any("the Registry crashed; restarting it in" in r.getMessage() for r in caplog.records)


def test_a_crashed_journal_writer_is_restarted_and_health_says_so_meanwhile(
        supervise: Supervise, dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.supervisor")
    running = supervise()
    journal = running.supervisor.parts.journal
    original = Journal._write
    crashed = threading.Event()

    def crashing(self: Journal, *args: Any) -> int:
        monkeypatch.setattr(Journal, "_write", original)
        crashed.set()
        raise RuntimeError("injected Journal bug")

    monkeypatch.setattr(Journal, "_write", crashing)
    lost = running.supervisor.parts.registry.register(token(1))
    assert crashed.wait(WAIT)
    _until(lambda: not running.supervisor.database_available(), "health to show the crash")
    _until(journal.alive, "the restart")
    running.supervisor.parts.registry.register(token(2)).result(WAIT)

    with pytest.raises(Exception, match="injected Journal bug"):
        lost.result(WAIT)
    assert running.supervisor.database_available()
    assert running.finish() == ExitStatus.OK
    registered = [d["token"] for kind, d in read_events(dsn) if kind == ev.DEVICE_REGISTERED]
    assert registered == [token(2)]
    assert any("the Journal's writer crashed; restarting it in" in r.getMessage()
               for r in caplog.records)


def test_crashes_faster_than_the_policy_allows_end_the_process_with_status_1(
        supervise: Supervise, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    running = supervise()
    registry = running.supervisor.parts.registry
    crashes = _crash_unregistrations(monkeypatch, times=1_000)
    while not running.status.done():
        if registry.alive():
            registry.unregister(token(len(crashes) + 1))
        time.sleep(0.02)
        assert len(crashes) <= FAST.max_restarts + 1
    assert running.status.result(WAIT) == ExitStatus.FAILURE
    assert len(crashes) == FAST.max_restarts + 1
    assert running.supervisor.stopping.is_set() and not running.supervisor.worker_alive()
    assert any(r.levelno == logging.CRITICAL and "exiting so that the service manager"
               in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("error", "retried"), [
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.errors.InsufficientPrivilege("permission denied for table runs"), False),
])
def test_a_schedule_the_log_refuses_counts_as_a_crash_an_outage_is_waited_out(
        supervise: Supervise, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, error: psycopg.Error, retried: bool) -> None:
    """Whether a run is due is asked of the log: while the database is away the question
    is asked again, without end; a refusal (a privilege taken away) would be refused
    forever, so it spends the restart budget and ends the process (status 1)."""
    asked: list[float] = []

    def failing(self: ClusterLog, interval: float) -> float:
        asked.append(time.monotonic())
        raise error

    monkeypatch.setattr(ClusterLog, "next_due", failing)
    monkeypatch.setattr(supervisor_module, "JOIN_POLL", 0.05)
    running = supervise()
    if retried:
        _until(lambda: len(asked) > FAST.max_restarts + 2, "the question to be asked again")
        assert not running.status.done()
        assert running.finish() == ExitStatus.OK
    else:
        assert running.status.result(WAIT) == ExitStatus.FAILURE
        assert len(asked) == FAST.max_restarts + 1
        assert any("the log refused to say whether a run is due: permission denied"
                   in r.getMessage() for r in caplog.records)


def test_a_crashed_run_is_resumed_after_a_back_off_and_finishes(
        supervise: Supervise, dsn: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.supervisor")
    tokens = [token(i) for i in range(1, 201)]
    register(dsn, tokens)
    crashed = threading.Event()
    original = SenderShard.on_receive

    def crash_once(self: SenderShard, message: Any) -> Any:
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected Sender shard crash")
        return original(self, message)

    monkeypatch.setattr(SenderShard, "on_receive", crash_once)
    running = supervise()
    _until(lambda: any(kind == ev.RUN_FINISHED for kind, _ in read_events(dsn)), "the run's end")
    assert running.finish() == ExitStatus.OK

    events = read_events(dsn)
    assert crashed.is_set()
    assert [d["run"] for kind, d in events if kind == ev.RUN_STARTED] == [1], "resumed, not anew"
    finals = Counter(d["token"] for kind, d in events if kind == ev.NOTIFICATION_DELIVERED)
    assert finals == Counter(tokens)
    sent = Counter(r.token for r in supervise.simulator.requests)
    assert set(sent) == set(tokens) and max(sent.values()) <= 2
    assert any("resuming the wakeup run in" in r.getMessage() for r in caplog.records)


def test_runs_follow_each_other_and_each_is_recorded_even_over_an_empty_registry(
        supervise: Supervise, dsn: str) -> None:
    simulator = supervise.simulator
    simulator.latency = 0.05
    running = supervise(interval=0.05, max_in_flight=10)
    _until(lambda: sum(1 for kind, _ in read_events(dsn) if kind == ev.RUN_FINISHED) >= 2,
           "two empty runs")
    tokens = [token(i) for i in range(1, 101)]  # a run now lasts ~0.5 s, ten intervals
    for device in tokens:
        running.supervisor.parts.registry.register(device).result(WAIT)
    _until(lambda: sum(1 for kind, _ in read_events(dsn) if kind == ev.RUN_FINISHED) >= 5,
           "runs over the tokens")
    assert running.finish() == ExitStatus.OK

    events = read_events(dsn)
    marks = [(kind, d["run"]) for kind, d in events if kind in (ev.RUN_STARTED, ev.RUN_FINISHED)]
    finished = [run for kind, run in marks if kind == ev.RUN_FINISHED]
    expected = [(kind, run) for run in finished for kind in (ev.RUN_STARTED, ev.RUN_FINISHED)]
    assert marks[:len(expected)] == expected, "a run started before the previous one ended"
    assert finished == list(range(1, len(finished) + 1))
    empty = [d for kind, d in events if kind == ev.RUN_FINISHED and d["tokens"] == 0]
    assert len(empty) >= 2
    per_run = Counter((d["run"], d["token"]) for kind, d in events
                      if kind == ev.NOTIFICATION_DELIVERED)
    assert set(per_run.values()) == {1}, "a token was sent twice within one run"

