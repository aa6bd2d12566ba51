"""Wakeup runs end to end: real PostgreSQL, the real simulator over TLS, real actors."""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pykka
import pytest
from psycopg import conninfo

from actors.pace import Progress
from actors.registry import RegistryHandle
from actors.wakeup import ProgressLogger, RunResult, WakeupRunner
from events import types as ev
from events.audit import audit_main
from events.journal import Journal
from events.store import LogReader
from relay.apns import ApnsClient
from relay.config import Config, RegistryConfig, WakeupConfig
from relay.simulator import ApnsSimulator, ScriptedOutcome, embedded_simulator

TOPIC = "org.example.wallet"
WAIT = 30.0
FINAL_TYPES = (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_ABANDONED)


def token(i: int) -> str:
    return f"{i:064x}"


@dataclass
class Relay:
    """The long-lived parts a supervisor owns, around one test database and simulator."""

    dsn: str
    simulator: ApnsSimulator
    journal: Journal
    registry: RegistryHandle
    client: ApnsClient
    config: Config
    reader: LogReader
    runners: list[WakeupRunner] = field(default_factory=list)

    def register(self, tokens: list[str]) -> None:
        now = ev.now_ms() - 60_000
        self.journal.append([ev.device_registered(t, now) for t in tokens]).result(WAIT)

    def runner(self, **wakeup: Any) -> WakeupRunner:
        settings: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2, **wakeup}
        config = Config(apns=self.config.apns, wakeup=WakeupConfig(**settings))
        runner = WakeupRunner(config, dsn=self.dsn, journal=self.journal, client=self.client,
                              registry=self.registry)
        self.runners.append(runner)
        return runner

    def restart_journal(self) -> None:
        """What a process restart does to the log's writer: pending appends are flushed."""
        self.registry.stop()
        self.journal.stop(timeout=10)
        self.journal = Journal(self.dsn)
        self.journal.start()
        self.registry = RegistryHandle.start(self.journal, self.reader, RegistryConfig())

    def events(self) -> list[tuple[int, str, dict[str, Any]]]:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT position, type, body FROM events ORDER BY position")
            return [(pos, type_, json.loads(bytes(body))) for pos, type_, body in rows]

    def requests_per_token(self) -> Counter[str | None]:
        return Counter(r.token for r in self.simulator.requests)


@pytest.fixture
def relay(dsn: str) -> Iterator[Relay]:
    simulator, apns = embedded_simulator(TOPIC)
    journal = Journal(dsn)
    journal.start()
    reader = LogReader(dsn)
    registry = RegistryHandle.start(journal, reader, RegistryConfig())
    client = ApnsClient(apns, expiration=3600.0)
    client.start()
    relay = Relay(dsn, simulator, journal, registry, client, Config(apns=apns), reader)
    try:
        yield relay
    finally:
        for runner in relay.runners:
            runner.request_stop()
        pykka.ActorRegistry.stop_all()  # before the Journal they append to
        relay.registry.stop()
        client.close()
        relay.journal.stop(timeout=10)
        reader.close()
        simulator.stop()


def _run_in_thread(runner: WakeupRunner,
                   progress: Callable[[Progress], None] | None = None) -> Future[RunResult]:
    outcome: Future[RunResult] = Future()

    def run() -> None:
        try:
            outcome.set_result(runner.run_once(progress))
        except BaseException as exc:
            outcome.set_exception(exc)

    threading.Thread(target=run, name="test-wakeup", daemon=True).start()
    return outcome


def _finals(events: list[tuple[int, str, dict[str, Any]]], run: int | None) -> Counter[str]:
    """Final outcomes per token in `run` (a dead-token failure is final too)."""
    return Counter(
        data["token"] for _, type_, data in events
        if data.get("run") == run and (type_ in FINAL_TYPES or (
            type_ == ev.NOTIFICATION_FAILED and data["verdict"] == "dead_token")))


def test_a_run_over_an_empty_registry_is_recorded(relay: Relay) -> None:
    result = relay.runner().run_once()
    assert result.finished and result.run == 1 and result.tokens == 0
    assert [t for _, t, _ in relay.events()] == [ev.RUN_STARTED, ev.RUN_FINISHED]


def test_each_registered_token_gets_one_valid_request_and_one_delivered_event(
        relay: Relay) -> None:
    tokens = [token(i) for i in range(1, 51)]
    relay.register(tokens)
    seen: list[Progress] = []
    result = relay.runner(max_in_flight=7, senders=3).run_once(seen.append)
    assert result.finished and not result.resumed and result.halted is None
    assert (result.tokens, result.delivered, result.failed) == (50, 50, 0)
    assert relay.requests_per_token() == Counter(tokens)
    assert all(r.valid and r.answer == (200, None) for r in relay.simulator.requests)
    events = relay.events()
    assert _finals(events, 1) == Counter(tokens)
    _, last_type, last = events[-1]
    assert last_type == ev.RUN_FINISHED
    assert (last["tokens"], last["delivered"], last["abandoned"]) == (50, 50, 0)
    assert seen[-1].done == seen[-1].total == 50
    assert LogReader(relay.dsn).unfinished_run() is None


def test_a_token_in_back_off_does_not_delay_a_thousand_healthy_tokens(relay: Relay) -> None:
    sick = token(0)  # sorts first, so it is sent first and backs off first
    healthy = [token(i) for i in range(1, 1001)]
    relay.register([sick, *healthy])
    relay.simulator.script(sick, ScriptedOutcome.failures(2, 503, "ServiceUnavailable"))
    result = relay.runner(backoff_base=2.0, backoff_max=2.0, attempts=3).run_once()

    assert result.finished and result.delivered == 1001 and result.failed == 2
    events = relay.events()
    sick_events = [(pos, t, d) for pos, t, d in events
                   if d.get("token") == sick and t != ev.DEVICE_REGISTERED]
    assert [(t, d["attempt"]) for _, t, d in sick_events] == [
        (ev.NOTIFICATION_FAILED, 1), (ev.NOTIFICATION_FAILED, 2), (ev.NOTIFICATION_DELIVERED, 3)]
    second_failure = sick_events[1][0]
    healthy_delivered = [pos for pos, t, d in events
                         if t == ev.NOTIFICATION_DELIVERED and d["token"] != sick]
    assert len(healthy_delivered) == 1000
    assert max(healthy_delivered) < second_failure
    # Each retry waited for the schedule it recorded, and kept the notification's apns-id.
    for (_, _, failed), (_, _, following) in itertools.pairwise(sick_events):
        assert ev.parse_iso_ms(following["at"]) >= ev.parse_iso_ms(failed["next_attempt_at"])
    assert len({d["apns_id"] for _, _, d in sick_events}) == 1
    sick_requests = [r for r in relay.simulator.requests if r.token == sick]
    assert len({r.header("apns-id") for r in sick_requests}) == 1


def test_a_bad_device_token_is_unregistered_and_the_others_delivered(relay: Relay) -> None:
    tokens = [token(i) for i in range(1, 101)]
    bad = tokens[41]
    relay.register(tokens)
    relay.simulator.script(bad, [ScriptedOutcome(400, "BadDeviceToken")])
    result = relay.runner().run_once()

    assert result.finished and result.halted is None
    assert (result.delivered, result.dead, result.unregistered, result.kept,
            result.failed) == (99, 1, 1, 0, 1)
    reader = LogReader(relay.dsn)
    assert reader.registration(bad)[0] is False
    assert all(reader.registration(t)[0] for t in tokens if t != bad)
    events = relay.events()
    unregistered = [d for _, t, d in events if t == ev.DEVICE_UNREGISTERED]
    assert len(unregistered) == 1
    assert unregistered[0]["token"] == bad and unregistered[0]["cause"] == "BadDeviceToken"
    assert relay.requests_per_token()[bad] == 1, "a dead token is never retried"
    assert events[-1][1] == ev.RUN_FINISHED and events[-1][2]["unregistered"] == 1


def test_five_dead_one_kept_counts_four_unregistered(relay: Relay,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Apple's verdict on one token predates its registration: the device came back, so
    it is kept, and every report says 5 dead, 4 unregistered, 1 kept."""
    tokens = [token(i) for i in range(1, 21)]
    relay.register(tokens)
    for dead in tokens[:4]:
        relay.simulator.script(dead, [ScriptedOutcome(400, "BadDeviceToken")])
    relay.simulator.script(tokens[4], [ScriptedOutcome(
        410, "Unregistered", timestamp_ms=ev.now_ms() - 3_600_000)])
    result = relay.runner().run_once()

    assert (result.dead, result.unregistered, result.kept) == (5, 4, 1)
    finished = relay.events()[-1]
    assert finished[1] == ev.RUN_FINISHED
    assert {k: finished[2][k] for k in ("dead", "unregistered", "kept", "v")} == {
        "dead": 5, "unregistered": 4, "kept": 1, "v": 2}
    run = relay.reader.unfinished_run()
    assert run is None
    with psycopg.connect(relay.dsn) as conn:
        assert conn.execute("SELECT dead, unregistered, kept FROM runs").fetchall() == [(5, 4, 1)]
    capsys.readouterr()
    assert audit_main(relay.dsn, ["--json", "--verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: report["runs"][0][k] for k in ("dead", "unregistered", "kept")} == {
        "dead": 5, "unregistered": 4, "kept": 1}
    assert report["runs"][0]["apns"] is None  # this runner was not told where it sends
    assert audit_main(relay.dsn, []) == 0
    assert "dead 5 (unregistered 4, kept 1)" in capsys.readouterr().out


def test_invalid_provider_token_halts_with_a_relay_halted_event(relay: Relay) -> None:
    tokens = [token(i) for i in range(1, 21)]
    relay.register(tokens)
    relay.simulator.script(tokens[0], [ScriptedOutcome(403, "InvalidProviderToken")])
    result = relay.runner(max_in_flight=1).run_once()

    assert result.halted is not None and not result.finished
    assert result.halted.halt_class == "configuration"
    assert result.halted.reason == "InvalidProviderToken"
    events = relay.events()
    halted = [d for _, t, d in events if t == ev.RELAY_HALTED]
    assert len(halted) == 1
    assert halted[0]["halt_class"] == "configuration" and halted[0]["run"] == result.run
    assert ev.RUN_FINISHED not in {t for _, t, _ in events}
    assert len(relay.simulator.requests) == 1, "no send after the halting answer"

    # Once the operator fixed the configuration, the next start resumes the same run.
    again = relay.runner().run_once()
    assert again.resumed and again.finished and again.run == result.run
    assert _finals(relay.events(), result.run) == Counter(tokens)


def test_a_stopped_run_resumes_without_resending_finished_tokens(relay: Relay) -> None:
    tokens = [token(i) for i in range(1, 301)]
    relay.register(tokens)
    relay.simulator.latency = 0.002
    first = relay.runner(max_in_flight=5, senders=2)
    outcome = _run_in_thread(first)
    assert relay.simulator.wait_for_requests(100, timeout=WAIT)
    first.request_stop()
    stopped = outcome.result(WAIT)
    assert stopped.stopped and stopped.drained and not stopped.finished
    done_before = stopped.delivered
    assert 100 <= done_before < 300
    assert LogReader(relay.dsn).unfinished_run() is not None

    resumed = relay.runner(max_in_flight=5, senders=2).run_once()
    assert resumed.resumed and resumed.finished and resumed.run == stopped.run
    assert (resumed.tokens, resumed.delivered) == (300, 300)
    assert _finals(relay.events(), stopped.run) == Counter(tokens)
    assert relay.requests_per_token() == Counter(tokens), "no token was sent twice"


def test_a_resumed_run_keeps_the_back_off_schedule_from_the_log(relay: Relay) -> None:
    sick = token(0)
    tokens = [sick, *(token(i) for i in range(1, 10))]
    relay.register(tokens)
    relay.simulator.script(sick, ScriptedOutcome.failures(1))
    first = relay.runner(backoff_base=1.0, backoff_max=1.0)

    def stop_when_only_the_sick_token_is_left(progress: Progress) -> None:
        if progress.done == len(tokens) - 1:
            first.request_stop()

    stopped = first.run_once(stop_when_only_the_sick_token_is_left)
    assert stopped.stopped and not stopped.finished and stopped.delivered == 9
    [failed] = [d for _, t, d in relay.events()
                if t == ev.NOTIFICATION_FAILED and d["token"] == sick]
    assert failed["next_attempt_at"] is not None

    resumed = relay.runner(backoff_base=1.0, backoff_max=1.0).run_once()
    assert resumed.resumed and resumed.finished and resumed.delivered == 10
    [delivered] = [d for _, t, d in relay.events()
                   if t == ev.NOTIFICATION_DELIVERED and d["token"] == sick]
    assert delivered["attempt"] == 2 and delivered["apns_id"] == failed["apns_id"]
    assert ev.parse_iso_ms(delivered["at"]) >= ev.parse_iso_ms(failed["next_attempt_at"])
    assert relay.requests_per_token() == Counter({sick: 2, **{t: 1 for t in tokens[1:]}})


def test_attempts_run_out_and_the_run_goes_on(relay: Relay) -> None:
    doomed, fine = token(1), token(2)
    relay.register([doomed, fine])
    relay.simulator.script(doomed, ScriptedOutcome.failures(5, 500, "InternalServerError"))
    result = relay.runner(attempts=3).run_once()
    assert result.finished and (result.delivered, result.abandoned, result.failed) == (1, 1, 3)
    [abandoned] = [d for _, t, d in relay.events() if t == ev.NOTIFICATION_ABANDONED]
    assert abandoned["token"] == doomed and abandoned["attempts"] == 3
    assert relay.requests_per_token()[doomed] == 3


def test_apns_wide_trouble_trips_the_breaker_which_probes_then_resumes(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    tokens = [token(i) for i in range(1, 31)]
    relay.register(tokens)
    for t in tokens:
        relay.simulator.script(t, ScriptedOutcome.failures(1, 503, "ServiceUnavailable"))
    caplog.set_level(logging.INFO, logger="actors.dispatcher")
    result = relay.runner(breaker_pause=0.3, attempts=3).run_once()
    assert result.finished and result.delivered == 30 and result.failed == 30
    paused = [r.created for r in caplog.records if "pausing all sends" in r.getMessage()]
    resumed = [r.created for r in caplog.records if "resuming sends" in r.getMessage()]
    assert paused and resumed
    assert resumed[0] - paused[0] >= 0.3, "the probe went out before the pause was over"
    assert relay.requests_per_token() == Counter({t: 2 for t in tokens})


def test_one_tokens_5xx_among_healthy_answers_does_not_trip_the_breaker(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    sick = token(0)
    healthy = [token(i) for i in range(1, 201)]
    relay.register([sick, *healthy])
    relay.simulator.script(sick, ScriptedOutcome.failures(2, 500, "InternalServerError"))
    caplog.set_level(logging.INFO, logger="actors.dispatcher")
    result = relay.runner(breaker_pause=60.0, attempts=3).run_once()  # a trip would stall 60 s
    assert result.finished and (result.delivered, result.failed) == (201, 2)
    assert not any("pausing all sends" in r.getMessage() for r in caplog.records)
    assert relay.requests_per_token()[sick] == 3


def test_an_abandoned_drain_resends_at_most_the_sends_in_flight(relay: Relay) -> None:
    """Like `kill -9`: the run stops without waiting for its sends; the next start resumes."""
    tokens = [token(i) for i in range(1, 301)]
    relay.register(tokens)
    relay.simulator.latency = 0.002
    first = relay.runner(max_in_flight=20, drain_timeout=0.0)
    outcome = _run_in_thread(first)
    assert relay.simulator.wait_for_requests(100, timeout=WAIT)
    first.request_stop()
    stopped = outcome.result(WAIT)
    assert stopped.stopped and not stopped.drained and not stopped.finished
    relay.restart_journal()

    resumed = relay.runner(max_in_flight=20).run_once()
    assert resumed.resumed and resumed.finished and resumed.run == stopped.run
    assert _finals(relay.events(), stopped.run) == Counter(tokens)
    sent = relay.requests_per_token()
    assert set(sent) == set(tokens)
    assert sum(1 for n in sent.values() if n > 1) <= 20
    assert max(sent.values()) <= 2


def test_progress_logger_reports_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="actors.wakeup")
    log_progress = ProgressLogger(interval=3600.0)
    log_progress(Progress(run=4, done=10, total=110, sends=12, elapsed=2.0))
    log_progress(Progress(run=4, done=20, total=110, sends=24, elapsed=3.0))  # throttled
    log_progress(Progress(run=4, done=110, total=110, sends=120, elapsed=9.0, dead=5,
                          unregistered=4, kept=1))  # the end
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "run 4: 10/110 tokens done (dead 0: unregistered 0, kept 0), 5.0 tokens/s, ETA 20s",
        "run 4: 110/110 tokens done (dead 5: unregistered 4, kept 1), 12.2 tokens/s, ETA 0s"]


def test_connections_cut_mid_run_lose_nothing_and_the_run_finishes(
        relay: Relay, admin_dsn: str) -> None:
    tokens = [token(i) for i in range(1, 601)]  # more than a page: the reader reads again
    relay.register(tokens)
    database = conninfo.conninfo_to_dict(relay.dsn)["dbname"]
    cut = threading.Event()

    def cut_every_connection(progress: Progress) -> None:
        if progress.done >= 50 and not cut.is_set():
            cut.set()
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s AND pid <> pg_backend_pid()", (database,))

    result = relay.runner(max_in_flight=10).run_once(cut_every_connection)
    assert cut.is_set()
    assert result.finished and (result.tokens, result.delivered) == (600, 600)
    assert _finals(relay.events(), result.run) == Counter(tokens)
    assert relay.requests_per_token() == Counter(tokens)


def test_a_read_the_database_refuses_fails_the_run_instead_of_retrying_forever(
        relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage is waited out; a refused statement (here: a table that is not there) is
    a bug, and retrying it would only hold the run forever: the run fails, and the
    supervisor's restart budget decides."""
    relay.register([token(1)])

    def refused(self: LogReader, run: int, after: str, limit: int) -> list[Any]:
        self._query("SELECT token FROM no_such_table WHERE token > %s", (after,))
        raise AssertionError("the query above is refused")

    monkeypatch.setattr(LogReader, "due_tokens", refused)
    outcome = _run_in_thread(relay.runner())
    with pytest.raises(psycopg.errors.UndefinedTable):
        outcome.result(WAIT)
