"""The Registry: registrations, and dead-token verdicts under the re-registration rule."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pykka
import pytest
from test_journal import Proxy

from actors import registry as registry_module
from actors.delivery import DeadVerdict
from actors.registry import RegistryBusy, RegistryHandle, decide_dead_token
from events import types as ev
from events.journal import Journal
from events.store import LogReader
from relay import database, metrics
from relay.config import RegistryConfig

TOKEN = "a1" * 32
T = 1_800_000_000_000  # Apple's verdict time
SKEW_MS = 5_000
WAIT = 10.0


def _verdict(at_ms: int = T, *, apple: int | None = T, token: str = TOKEN,
             cause: str = "Unregistered") -> DeadVerdict:
    return DeadVerdict(token, cause, verdict_at_ms=at_ms, apple_timestamp_ms=apple, run=3,
                       apns_id="5a3c1e9e-0000-4000-8000-000000000001")


# --- the rule, without threads ------------------------------------------------------------

def test_registered_before_the_verdict_minus_skew_is_unregistered() -> None:
    event = decide_dead_token(_verdict(), active=True, registered_at_ms=T - SKEW_MS,
                              clock_skew_ms=SKEW_MS, now_ms=T + 100)
    assert event is not None and event.type == ev.DEVICE_UNREGISTERED
    assert event.data["cause"] == "Unregistered"
    assert event.data["apple_timestamp_ms"] == T and event.data["run"] == 3


def test_registered_after_the_verdict_is_kept() -> None:
    event = decide_dead_token(_verdict(), active=True, registered_at_ms=T + 60_000,
                              clock_skew_ms=SKEW_MS, now_ms=T + 100)
    assert event is not None and event.type == ev.UNREGISTER_SKIPPED
    assert event.data["registered_at"] == ev.iso_ms(T + 60_000)
    assert event.data["verdict_at"] == ev.iso_ms(T)
    assert "registered again" in event.data["why"]


def test_registered_within_the_clock_skew_before_the_verdict_is_kept() -> None:
    event = decide_dead_token(_verdict(), active=True, registered_at_ms=T - SKEW_MS + 1,
                              clock_skew_ms=SKEW_MS, now_ms=T + 100)
    assert event is not None and event.type == ev.UNREGISTER_SKIPPED


def test_a_token_no_longer_registered_needs_no_event() -> None:
    assert decide_dead_token(_verdict(), active=False, registered_at_ms=T - 10**6,
                             clock_skew_ms=SKEW_MS, now_ms=T) is None


# --- the actor over real PostgreSQL ---------------------------------------------------------

class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def journal(dsn: str) -> Iterator[Journal]:
    journal = Journal(dsn)
    journal.start()
    yield journal
    pykka.ActorRegistry.stop_all()  # before the Journal they append to
    journal.stop(timeout=10)


@pytest.fixture
def reader(dsn: str) -> Iterator[LogReader]:
    reader = LogReader(dsn)
    yield reader
    reader.close()


def _start(journal: Journal, reader: LogReader, clock: Clock) -> RegistryHandle:
    return RegistryHandle.start(journal, reader, RegistryConfig(clock_skew=SKEW_MS / 1000),
                                clock_ms=clock)


def _events(dsn: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT type, body FROM events ORDER BY position").fetchall()
    return [(type_, json.loads(bytes(body))) for type_, body in rows]


def test_register_and_unregister_resolve_after_commit(dsn: str, journal: Journal,
                                                      reader: LogReader) -> None:
    registry = _start(journal, reader, Clock(T))
    registry.register(TOKEN).result(WAIT)
    assert reader.registration(TOKEN) == (True, T)
    registry.unregister(TOKEN).result(WAIT)
    assert reader.registration(TOKEN)[0] is False
    registry.unregister(TOKEN).result(WAIT)  # idempotent: nothing more to write
    assert [t for t, _ in _events(dsn)] == [ev.DEVICE_REGISTERED, ev.DEVICE_UNREGISTERED]
    registry.stop()


def test_dead_token_registered_before_the_verdict_is_unregistered(
        dsn: str, journal: Journal, reader: LogReader) -> None:
    clock = Clock(T - 3_600_000)
    registry = _start(journal, reader, clock)
    registry.register(TOKEN).result(WAIT)
    clock.now = T + 1000
    registry.dead_token(_verdict()).result(WAIT)
    assert reader.registration(TOKEN)[0] is False
    type_, data = _events(dsn)[-1]
    assert type_ == ev.DEVICE_UNREGISTERED
    assert data["cause"] == "Unregistered" and data["apple_timestamp_ms"] == T
    registry.stop()


def test_dead_token_registered_again_after_the_verdict_is_kept(
        dsn: str, journal: Journal, reader: LogReader) -> None:
    clock = Clock(T + 60_000)
    registry = _start(journal, reader, clock)
    registry.register(TOKEN).result(WAIT)
    registry.dead_token(_verdict()).result(WAIT)
    assert reader.registration(TOKEN) == (True, T + 60_000)
    type_, data = _events(dsn)[-1]
    assert type_ == ev.UNREGISTER_SKIPPED
    assert data["registered_at"] == ev.iso_ms(T + 60_000) and data["cause"] == "Unregistered"
    registry.stop()


def test_a_registration_not_yet_committed_already_counts(
        dsn: str, journal: Journal, reader: LogReader) -> None:
    """The verdict is older than a registration still on its way to the log: keep the token."""
    clock = Clock(T - 3_600_000)
    registry = _start(journal, reader, clock)
    registry.register(TOKEN).result(WAIT)
    clock.now = T + 60_000
    again = registry.register(TOKEN)  # not awaited: the verdict follows right behind it
    dead = registry.dead_token(_verdict())
    again.result(WAIT)
    dead.result(WAIT)
    assert reader.registration(TOKEN) == (True, T + 60_000)
    assert _events(dsn)[-1][0] == ev.UNREGISTER_SKIPPED
    registry.stop()


def test_a_verdict_without_apples_timestamp_uses_the_answer_time(
        dsn: str, journal: Journal, reader: LogReader) -> None:
    clock = Clock(T - 10_000)
    registry = _start(journal, reader, clock)
    registry.register(TOKEN).result(WAIT)
    clock.now = T
    registry.dead_token(_verdict(T, apple=None, cause="BadDeviceToken")).result(WAIT)
    assert reader.registration(TOKEN)[0] is False
    type_, data = _events(dsn)[-1]
    assert type_ == ev.DEVICE_UNREGISTERED and data["cause"] == "BadDeviceToken"
    assert data["apple_timestamp_ms"] is None
    registry.stop()


def test_a_stopped_registry_fails_requests_instead_of_hanging_until_restarted(
        journal: Journal, reader: LogReader) -> None:
    registry = _start(journal, reader, Clock(T))
    registry.stop()
    assert not registry.alive()
    with pytest.raises(RuntimeError, match="not running"):
        registry.register(TOKEN).result(WAIT)
    registry.restart()
    assert registry.alive()
    registry.register(TOKEN).result(WAIT)
    assert reader.registration(TOKEN) == (True, T)
    registry.stop()


def test_the_registered_devices_gauge_follows_the_log(
        journal: Journal, reader: LogReader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "GAUGE_REFRESH", 0.05)
    def gauge_reaches(value: int) -> None:  # counted off the actor: soon, not at once
        deadline = time.monotonic() + WAIT
        while metrics.DEVICES_REGISTERED._value.get() != value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.DEVICES_REGISTERED._value.get() == value

    registry = _start(journal, reader, Clock(T))
    gauge_reaches(0)
    for token in ("b1" * 32, "b2" * 32, "b3" * 32):
        registry.register(token).result(WAIT)
    registry.register("b1" * 32).result(WAIT)  # again: still three devices
    registry.unregister("b2" * 32).result(WAIT)
    gauge_reaches(2)
    registry.stop()


def test_settled_registrations_leave_the_overlay_within_a_sweep(
        journal: Journal, reader: LogReader, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay holds a registration only until its commit settles (plus a sweep): kept
    for a whole gauge period under load, these entries made Python's full collections
    pause the API for 100-150 ms."""
    monkeypatch.setattr(registry_module, "GAUGE_REFRESH", 3600.0)
    monkeypatch.setattr(registry_module, "OVERLAY_SWEEP", 0.05)
    registry = _start(journal, reader, Clock(T))
    commits = [registry.register(f"{i:064x}") for i in range(200)]
    for commit in commits:
        commit.result(WAIT)
    overlay = registry._overlay  # what it holds is the point here
    deadline = time.monotonic() + WAIT
    while overlay.entries() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert overlay.entries() == 0
    registry.stop()


# --- the log unreadable: the Registry never blocks ------------------------------------------

@pytest.fixture
def cut_reads(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Proxy, LogReader]]:
    """A LogReader through a TCP proxy that can cut it off the database (the Journal keeps
    its own connection), with the retry policy at test speed."""
    monkeypatch.setattr(database, "RETRY_MIN", 0.01)
    monkeypatch.setattr(database, "RETRY_MAX", 0.05)
    proxy = Proxy(dsn)
    reader = LogReader(proxy.dsn)
    yield proxy, reader
    reader.close()
    proxy.close()


def test_an_unregistration_waiting_for_an_unreadable_log_holds_back_no_other_token(
        dsn: str, cut_reads: tuple[Proxy, LogReader], caplog: pytest.LogCaptureFixture) -> None:
    proxy, reader = cut_reads
    # Commits wait 0.5 s for company, so the second token's registration is still in the
    # overlay when its unregistration comes: decided without reading the log.
    journal = Journal(dsn, max_delay=0.5)
    journal.start()
    try:
        registry = _start(journal, reader, Clock(T))
        registry.register(TOKEN).result(WAIT)
        proxy.cut()
        stuck = registry.unregister(TOKEN)  # must read the log: retried while it is cut
        other = "c1" * 32
        registry.register(other)
        registry.unregister(other).result(WAIT)
        assert not stuck.done()
        proxy.restore()
        stuck.result(WAIT)
        registry.stop()
    finally:
        journal.stop(timeout=10)
    assert [(t, d["token"]) for t, d in _events(dsn)] == [
        (ev.DEVICE_REGISTERED, TOKEN), (ev.DEVICE_REGISTERED, other),
        (ev.DEVICE_UNREGISTERED, other), (ev.DEVICE_UNREGISTERED, TOKEN)]


def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.01)


def test_a_registration_during_a_read_wins_over_what_the_read_saw(
        dsn: str, journal: Journal, cut_reads: tuple[Proxy, LogReader],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unregistration whose read saw the token inactive still unregisters it when the
    device registered again while that read was out: the overlay entry newer than the
    read decides, even once it is settled and the overlay is swept many times."""
    monkeypatch.setattr(registry_module, "OVERLAY_SWEEP", 0.01)
    proxy, reader = cut_reads
    registry = _start(journal, reader, Clock(T))
    registry.register(TOKEN).result(WAIT)
    registry.unregister(TOKEN).result(WAIT)
    proxy.cut()
    again = registry.unregister(TOKEN)  # reads the token as inactive, once it can
    _wait_for_log(caplog, "cannot read the registration")
    registry.register(TOKEN).result(WAIT)  # meanwhile the device registers again
    proxy.restore()
    again.result(WAIT)
    assert [t for t, _ in _events(dsn)][-2:] == [ev.DEVICE_REGISTERED, ev.DEVICE_UNREGISTERED]
    assert LogReader(dsn).registration(TOKEN)[0] is False
    registry.stop()


def test_a_dead_token_verdict_waits_for_no_read_of_the_log(
        dsn: str, journal: Journal, cut_reads: tuple[Proxy, LogReader]) -> None:
    """The Journal decides a verdict under the head lock, so it goes through while the
    Registry's reads are cut; a registration after it is not overruled."""
    proxy, reader = cut_reads
    clock = Clock(T - 3_600_000)
    registry = _start(journal, reader, clock)
    registry.register(TOKEN).result(WAIT)
    proxy.cut()
    clock.now = T + 60_000
    assert registry.dead_token(_verdict()).result(WAIT) == ev.DEVICE_UNREGISTERED
    registry.register(TOKEN).result(WAIT)
    proxy.restore()
    assert LogReader(dsn).registration(TOKEN) == (True, T + 60_000)
    registry.stop()


def test_beyond_its_mailbox_bound_the_registry_refuses_instead_of_queueing(
        dsn: str, journal: Journal, cut_reads: tuple[Proxy, LogReader],
        caplog: pytest.LogCaptureFixture) -> None:
    proxy, reader = cut_reads
    registry = RegistryHandle.start(journal, reader, RegistryConfig(), mailbox=2)
    tokens = [f"{i:02x}" * 32 for i in range(1, 4)]
    for token in tokens:
        registry.register(token).result(WAIT)
    proxy.cut()
    held = [registry.unregister(token) for token in tokens[:2]]
    _wait_for_log(caplog, "cannot read the registration")
    with pytest.raises(RegistryBusy):
        registry.unregister(tokens[2])
    registry.dead_token(_verdict(token=tokens[2]))  # verdicts are always taken
    proxy.restore()
    for future in held:
        future.result(WAIT)
    registry.unregister(tokens[2]).result(WAIT)  # the slots came back
    assert all(LogReader(dsn).registration(token)[0] is False for token in tokens)
    registry.stop()


def test_stopping_fails_the_requests_still_waiting_for_a_read(
        journal: Journal, cut_reads: tuple[Proxy, LogReader]) -> None:
    proxy, reader = cut_reads
    registry = _start(journal, reader, Clock(T))
    registry.register(TOKEN).result(WAIT)
    proxy.cut()
    waiting = registry.unregister(TOKEN)
    registry.stop(timeout=WAIT)
    with pytest.raises(RuntimeError, match="stopped before reading"):
        waiting.result(WAIT)


class RefusingReader(LogReader):
    """A LogReader whose registration query the database refuses (a bug, not an outage)."""

    def registration(self, token: str) -> tuple[bool, int | None]:
        self._query("SELECT active FROM no_such_table WHERE token = %s", (token,))
        raise AssertionError("the query above is refused")


def test_a_read_the_database_refuses_fails_its_requests_instead_of_retrying_forever(
        dsn: str, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    reader = RefusingReader(dsn)
    try:
        registry = _start(journal, reader, Clock(T))
        with pytest.raises(psycopg.errors.UndefinedTable):
            registry.unregister(TOKEN).result(WAIT)
        assert "the database refused the query" in caplog.text
        assert "retrying in" not in caplog.text
        with pytest.raises(psycopg.errors.UndefinedTable):  # the next request reads again
            registry.unregister(TOKEN).result(WAIT)
        registry.stop()
    finally:
        reader.close()
