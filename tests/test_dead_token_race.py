"""The re-registration rule is decided under the head lock: a registration another
process commits while a dead-token verdict waits is seen, never overruled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pykka
import pytest

from actors.delivery import DeadVerdict
from actors.registry import RegistryHandle
from events import journal as journal_module
from events import types as ev
from events.batch_sql import append_bulk
from events.journal import Journal
from events.store import LogReader
from relay.config import RegistryConfig

TOKEN = "d0" * 32
WAIT = 15.0

# Another relay process: it takes the head lock (as every appender does), waits for a
# go, then registers TOKEN again in that same transaction and commits.
OTHER_PROCESS = textwrap.dedent("""
    import sys
    import psycopg
    from events import batch_sql, projection, types as ev
    with psycopg.connect(sys.argv[1]) as conn:
        projection.prepare(conn)
        with conn.cursor() as cur:
            head, previous = cur.execute(
                "SELECT position, hash FROM log_head FOR UPDATE").fetchone()
            print("locked", flush=True)
            sys.stdin.readline()
            encoded = [batch_sql.encode(ev.device_registered(sys.argv[2], ev.now_ms()))]
            _, _, patch = batch_sql.copy_events(cur, encoded, head, previous)
            patch.copy(cur)
            patch.merge(cur)
        conn.commit()
    print("committed", flush=True)
""")


@pytest.fixture
def registry(dsn: str) -> Iterator[RegistryHandle]:
    journal = Journal(dsn)
    journal.start()
    reader = LogReader(dsn)
    handle = RegistryHandle.start(journal, reader, RegistryConfig(clock_skew=5.0))
    yield handle
    pykka.ActorRegistry.stop_all()
    journal.stop(10)
    reader.close()


def test_a_registration_committed_by_another_process_while_the_verdict_waits_is_kept(
        dsn: str, registry: RegistryHandle) -> None:
    now = ev.now_ms()
    append_bulk(dsn, [ev.device_registered(TOKEN, now - 3_600_000)])
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, dsn, TOKEN],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "locked"
        # The verdict (Apple: dead 30 s ago) arrives while the other process holds the
        # lock; the registration it is about to commit is later than that.
        decided = registry.dead_token(DeadVerdict(
            TOKEN, "Unregistered", verdict_at_ms=now - 30_000, apple_timestamp_ms=now - 30_000,
            run=1, apns_id="a"))
        time.sleep(0.5)  # the Registry and the Journal have taken the verdict by now
        assert not decided.done(), "the decision waits for the head lock"
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "committed"
        assert decided.result(WAIT) == ev.UNREGISTER_SKIPPED
    finally:
        other.kill()
        other.wait()
    with psycopg.connect(dsn) as conn:
        types = [t for (t,) in conn.execute("SELECT type FROM events ORDER BY position")]
        active = conn.execute("SELECT active FROM devices WHERE token = %s", (TOKEN,)).fetchone()
        body = conn.execute("SELECT body FROM events ORDER BY position DESC LIMIT 1").fetchone()
    assert types == [ev.DEVICE_REGISTERED, ev.DEVICE_REGISTERED, ev.UNREGISTER_SKIPPED]
    assert active == (True,)
    assert body is not None and "registered again" in json.loads(bytes(body[0]))["why"]


def test_a_verdict_on_a_token_registered_long_before_unregisters_it(
        dsn: str, registry: RegistryHandle) -> None:
    now = ev.now_ms()
    append_bulk(dsn, [ev.device_registered(TOKEN, now - 3_600_000)])
    verdict = DeadVerdict(TOKEN, "Unregistered", verdict_at_ms=now - 30_000,
                          apple_timestamp_ms=now - 30_000, run=1, apns_id="a")
    assert registry.dead_token(verdict).result(WAIT) == ev.DEVICE_UNREGISTERED
    assert registry.dead_token(verdict).result(WAIT) is None  # no longer registered


def test_while_the_registration_cannot_be_read_nothing_is_unregistered(
        dsn: str, registry: RegistryHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read fails inside the append transaction: that batch writes nothing and is
    retried; the verdict is decided on the registration once it can be read."""
    now = ev.now_ms()
    append_bulk(dsn, [ev.device_registered(TOKEN, now - 3_600_000)])
    real_decide = journal_module._decide
    failed, registered = threading.Event(), threading.Event()

    def unreadable_once(cur: Any, batch: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise psycopg.OperationalError("the devices table cannot be read")
        real_decide(cur, batch)

    def pause_until_registered(self: Journal, delay: float) -> bool:
        return registered.wait(WAIT)  # the lock is free: the device registers again

    monkeypatch.setattr(journal_module, "_decide", unreadable_once)
    monkeypatch.setattr(Journal, "_pause", pause_until_registered)
    verdict = DeadVerdict(TOKEN, "Unregistered", verdict_at_ms=now - 30_000,
                          apple_timestamp_ms=now - 30_000, run=1, apns_id="a")
    decided = registry.dead_token(verdict)
    assert failed.wait(WAIT)
    with psycopg.connect(dsn) as conn:  # nothing was written by the failed attempt
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
    append_bulk(dsn, [ev.device_registered(TOKEN, ev.now_ms())])
    registered.set()
    assert decided.result(WAIT) == ev.UNREGISTER_SKIPPED
    with psycopg.connect(dsn) as conn:
        types = [t for (t,) in conn.execute("SELECT type FROM events ORDER BY position")]
    assert types == [ev.DEVICE_REGISTERED, ev.DEVICE_REGISTERED, ev.UNREGISTER_SKIPPED]
