"""Several relays on one PostgreSQL (relay/cluster.py): leases, fencing, one run at a time.

First the parts against real PostgreSQL (the lease keeper, the Journal's fence, the run's
start and end decided once); then whole relay processes (`python -m relay`) against the
simulator: three sharing a run, one killed with -9, one frozen past its lease, two
starting the same due run at once.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apns_fixtures
import psycopg
import pytest
import relay_fixtures
import yaml
from apns_fixtures import SimulatorFactory, token
from relay_fixtures import (
    RelayProcess,
    events,
    finals,
    free_port,
    register,
    start_relay,
    wait_healthy,
    write_config,
)

from events import types as ev
from events.audit import audit_main
from events.journal import Fenced, Journal
from relay import metrics
from relay.cluster import (
    POINTS,
    ClusterLog,
    LeaseKeeper,
    Leases,
    Member,
    shard_bounds,
    shard_of,
    token_point,
)
from relay.config import ApnsConfig, ClusterConfig

simulator_factory = apns_fixtures.simulator_factory
processes = relay_fixtures.processes

WAIT = 60.0
OUTCOMES = (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_FAILED, ev.NOTIFICATION_ABANDONED)


def _member(name: str) -> Member:
    return Member(f"test:{name}", "test", 1)


@pytest.fixture
def keepers(dsn: str) -> Iterator[list[LeaseKeeper]]:
    started: list[LeaseKeeper] = []
    yield started
    for keeper in started:
        keeper.stop()


def _keeper(keepers: list[LeaseKeeper], dsn: str, name: str, **config: Any) -> LeaseKeeper:
    keeper = LeaseKeeper(dsn, ClusterConfig(**{"shards": 8, "lease_ttl": 1.0, **config}),
                         _member(name))
    keeper.start()
    keepers.append(keeper)
    return keeper


# --- shards -----------------------------------------------------------------------------

def test_shards_are_point_ranges_that_cover_every_point_once_and_agree_with_sql(dsn: str) -> None:
    for shards in (1, 3, 64, 1000):
        bounds = [shard_bounds(s, shards) for s in range(shards)]
        assert bounds[0][0] == 0 and bounds[-1][1] == POINTS
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        for point in (0, 1, 12345, POINTS - 1):
            shard = point * shards // POINTS
            low, high = bounds[shard]
            assert low <= point < high
    tokens = [token(i) for i in range(1, 200)]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT t, token_point(t) FROM unnest(%s::text[]) t",
                            (tokens,)).fetchall()
    assert {t: p for t, p in rows} == {t: token_point(t) for t in tokens}
    assert len({shard_of(t, 8) for t in tokens}) == 8, "tokens spread over the shards"


# --- leases -------------------------------------------------------------------------------

def test_live_processes_share_the_shards_and_a_newcomer_gets_its_share(
        dsn: str, keepers: list[LeaseKeeper]) -> None:
    first = _keeper(keepers, dsn, "a")
    assert set(first.leases().held) == set(range(8))
    second = _keeper(keepers, dsn, "b")
    # The first gives up its excess (no run is driven: at once), the second takes it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        first.renew()
        second.renew()
        if len(first.leases().held) == len(second.leases().held) == 4:
            break
    held = [set(first.leases().held), set(second.leases().held)]
    assert held[0] | held[1] == set(range(8)) and not held[0] & held[1]
    log = [(kind, d) for kind, d in events(dsn) if kind in (ev.SHARD_LEASED, ev.SHARD_RELEASED)]
    released = [d for kind, d in log if kind == ev.SHARD_RELEASED]
    assert {d["shard"] for d in released} == held[1]
    assert all(d["why"] == "rebalancing" and d["process"] == "test:a" for d in released)
    taken = {d["shard"]: d for kind, d in log if kind == ev.SHARD_LEASED
             and d["process"] == "test:b"}
    assert set(taken) == held[1] and all(d["epoch"] == 2 for d in taken.values())


def test_an_expired_lease_is_taken_over_with_a_new_epoch(
        dsn: str, keepers: list[LeaseKeeper]) -> None:
    stuck = LeaseKeeper(dsn, ClusterConfig(shards=4, lease_ttl=1.0), _member("stuck"))
    stuck.renew()  # one round, never renewed again: as a process frozen or killed
    assert set(stuck.leases().held) == {0, 1, 2, 3}
    other = _keeper(keepers, dsn, "other", shards=4)
    assert other.leases().held == {}  # the stuck process still counts, and holds them
    time.sleep(1.2)
    assert not stuck.leases().valid, "the stuck one sends nothing more, by its own clock"
    other.renew()
    assert other.leases().held == {0: 2, 1: 2, 2: 2, 3: 2}
    took = [d for kind, d in events(dsn)
            if kind == ev.SHARD_LEASED and d["process"] == "test:other"]
    assert {d["took_from"] for d in took} == {"test:stuck"}
    stuck.renew()  # it wakes up: the renewal finds the shards gone
    assert stuck.leases() == Leases()


def _split_keepers(dsn: str, config: ClusterConfig) -> tuple[LeaseKeeper, LeaseKeeper]:
    """A process that stopped renewing and one that goes on, two shards each: once the first
    one's leases lapse, the second's renewals try to take them."""
    stuck, other = (LeaseKeeper(dsn, config, _member(n)) for n in ("stuck", "other"))
    stuck.renew()
    other.renew()  # two members: a share of 2 each, all 4 still the stuck one's
    stuck.renew()  # gives up its excess (it drives no run: at once)
    other.renew()
    assert set(stuck.leases().held) == {0, 1} and set(other.leases().held) == {2, 3}
    return stuck, other


def test_a_process_paused_holding_the_head_lock_delays_takes_never_renewals(
        dsn: str, keepers: list[LeaseKeeper]) -> None:
    """Another process stopped in the middle of an append holds the log's head lock (here:
    a transaction left open). Taking the shards of a process whose leases expired waits
    for that lock, briefly; renewing the shards held never waits for it."""
    config = ClusterConfig(shards=4, lease_ttl=2.0)
    _, other = _split_keepers(dsn, config)
    mine = other.leases().held
    with psycopg.connect(dsn) as paused:
        paused.execute("SELECT 1 FROM log_head FOR UPDATE")  # and never commits
        deadline = time.monotonic() + 2 * config.lease_ttl  # past the stuck one's leases
        while time.monotonic() < deadline:
            other.renew()
            time.sleep(other.renew_every)
        assert other.leases().valid, "renewed all along"
        assert other.leases().held == mine, "nothing taken while the head was locked"
        paused.rollback()
    other.renew()
    assert set(other.leases().held) == {0, 1, 2, 3}
    assert {s: e for s, e in other.leases().held.items() if s in mine} == mine


def _session_alive(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone() == (1,)


def test_a_relay_paused_in_the_middle_of_a_write_is_ended_by_the_next_take(dsn: str) -> None:
    """Paused between the messages of one write (here: a COPY whose rows never come), a
    relay's session holds the head lock where PostgreSQL times nothing. The next process
    whose take finds the lock held ends that session once it has waited `hold_limit`, and
    takes the shards; a relay session that is working under the lock is left alone."""
    config = ClusterConfig(shards=4, lease_ttl=2.0)
    _, other = _split_keepers(dsn, config)
    mine = other.leases().held
    time.sleep(config.lease_ttl + 0.2)  # the stuck one's leases lapse
    # Working under the lock (a long statement, not a wait on its client): never ended.
    with psycopg.connect(dsn, application_name="relay-journal") as working:
        working.execute("SELECT 1 FROM log_head FOR UPDATE")
        sleeper = threading.Thread(target=working.execute, args=("SELECT pg_sleep(2.5)",))
        sleeper.start()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            other.renew()
        sleeper.join()
        assert other.leases().held == mine, "nothing taken while the head was locked"
        working.rollback()
    ended_before = metrics.HEAD_HOLDERS_ENDED._value.get()
    stalled = psycopg.connect(dsn, application_name="relay-journal")
    try:
        stalled.execute("CREATE TEMP TABLE rows_to_come (x int)")
        stalled.execute("SELECT 1 FROM log_head FOR UPDATE")
        pid = stalled.info.backend_pid
        with pytest.raises(psycopg.OperationalError), \
                stalled.cursor().copy("COPY rows_to_come FROM STDIN"):
            started = time.monotonic()
            while time.monotonic() < started + 10 and _session_alive(dsn, pid):
                other.renew()
                time.sleep(other.renew_every)
            waited = time.monotonic() - started
            assert not _session_alive(dsn, pid), "the stalled session was ended"
    finally:
        stalled.close()
    assert waited >= config.hold_limit, "not before it had waited hold_limit"
    assert metrics.HEAD_HOLDERS_ENDED._value.get() - ended_before == 1
    other.renew()
    assert set(other.leases().held) == {0, 1, 2, 3}
    assert audit_main(dsn, ["--verify"]) == 0


def test_a_stop_releases_every_shard_at_once(dsn: str, keepers: list[LeaseKeeper]) -> None:
    keeper = LeaseKeeper(dsn, ClusterConfig(shards=4, lease_ttl=10.0), _member("leaving"))
    keeper.start()
    keeper.stop()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cluster_shards WHERE holder IS NOT NULL"
                            ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM cluster_members").fetchone() == (0,)
    after = _keeper(keepers, dsn, "next", shards=4)
    assert set(after.leases().held) == {0, 1, 2, 3}, "no waiting for the lease to run out"


# --- fencing --------------------------------------------------------------------------------

def _delivered(t: str, fence: tuple[int, int]) -> ev.Event:
    return ev.notification_delivered(1, t, ev.now_ms(), attempt=1, apns_id="a", status=200,
                                     latency_ms=1.0, fence=fence)


def test_the_journal_refuses_outcomes_of_a_stale_epoch_and_writes_the_rest(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO cluster_shards (shard, epoch) VALUES (0, 3), (1, 5)")
    journal = Journal(dsn, max_delay=0.2)  # one batch for all four
    journal.start()
    refused_before = metrics.FENCED_OUTCOMES._value.get()
    try:
        current = journal.append([_delivered("aa", (0, 3))])
        stale = journal.append([_delivered("bb", (1, 4)), _delivered("cc", (1, 4))])
        other = journal.append([_delivered("dd", (1, 5))])
        plain = journal.append([ev.device_registered("ee", ev.now_ms())])
        assert len(current.result(WAIT)) == 1 and len(other.result(WAIT)) == 1
        assert len(plain.result(WAIT)) == 1
        with pytest.raises(Fenced):
            stale.result(WAIT)
        # The one-round-trip path (a lone small batch after our own commit) is fenced too.
        with pytest.raises(Fenced):
            journal.append([_delivered("ff", (0, 2))]).result(WAIT)
        assert len(journal.append([_delivered("gg", (0, 3))]).result(WAIT)) == 1
    finally:
        journal.stop(10)
    written = {d["token"] for _, d in events(dsn)}
    assert written == {"aa", "dd", "ee", "gg"}
    assert metrics.FENCED_OUTCOMES._value.get() - refused_before == 3
    assert audit_main(dsn, ["--verify"]) == 0


# --- one run, started and finished once --------------------------------------------------

def test_processes_finding_a_run_due_at_once_start_one_run(dsn: str) -> None:
    register(dsn, [token(i) for i in range(1, 11)])
    barrier = threading.Barrier(8)

    def start() -> tuple[int | None, bool]:
        runs = ClusterLog(dsn)
        try:
            barrier.wait()
            record, ours = runs.start_or_join(3600, force=False)
            return (None if record is None else record.run), ours
        finally:
            runs.close()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: start(), range(8)))
    assert {run for run, _ in answers} == {1}
    assert sum(ours for _, ours in answers) == 1
    assert [d["run"] for kind, d in events(dsn) if kind == ev.RUN_STARTED] == [1]
    runs = ClusterLog(dsn)
    try:
        assert runs.start_or_join(3600, force=False) == (runs.start_or_join(3600, force=True)[0],
                                                         False), "joined, never a second run"
        assert not runs.finish(1).finished, "ten tokens without an outcome"
    finally:
        runs.close()


# --- whole relays ---------------------------------------------------------------------------

def _config(tmp_path: Path, name: str, dsn: str, apns: ApnsConfig, *, lease_ttl: float,
            **wakeup: Any) -> tuple[Path, str]:
    directory = tmp_path / name
    directory.mkdir()
    port = free_port()
    path = write_config(directory, dsn, apns, port, **wakeup)
    raw = yaml.safe_load(path.read_text())
    raw["cluster"] = {"shards": 64, "lease_ttl": lease_ttl}
    path.write_text(yaml.safe_dump(raw))
    return path, f"http://127.0.0.1:{port}"


def _start(processes: list[RelayProcess], tmp_path: Path, dsn: str, apns: ApnsConfig,
           count: int, *, lease_ttl: float = 2.0, **wakeup: Any) -> list[RelayProcess]:
    started = []
    for i in range(count):
        config, url = _config(tmp_path, f"relay{i}", dsn, apns, lease_ttl=lease_ttl, **wakeup)
        relay = start_relay(processes, config, name=f"relay{i}")
        wait_healthy(url, relay)
        started.append(relay)
    return started


def _wait_for(what: str, check: Any, relays: list[RelayProcess], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} never happened:\n" + "\n".join(r.log[-3000:] for r in relays))


def _run_finished(dsn: str, run: int) -> bool:
    return any(kind == ev.RUN_FINISHED and d["run"] == run for kind, d in events(dsn))


def _live_members(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(DISTINCT holder) FROM cluster_shards"
                           " WHERE expires_at > now()").fetchone()
    return int(row[0]) if row else 0


def _holder(dsn: str, pid: int) -> str:
    """The cluster's name for the relay process `pid`."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT process FROM cluster_members WHERE pid = %s", (pid,)).fetchone()
    assert row is not None, f"process {pid} is no cluster member"
    return str(row[0])


def _shards_held_by(dsn: str, holder: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM cluster_shards WHERE holder = %s",
                           (holder,)).fetchone()
    return int(row[0]) if row else 0


def _drivers(log: list[tuple[str, dict[str, Any]]], run: int) -> Counter[str]:
    """Outcome events of `run` per process, by the lease (shard, epoch) they carry."""
    holder = {(d["shard"], d["epoch"]): d["process"] for kind, d in log
              if kind == ev.SHARD_LEASED}
    return Counter(holder[(d["shard"], d["epoch"])] for kind, d in log
                   if kind in OUTCOMES and d["run"] == run)


def _sent_in(simulator: Any, log: list[tuple[str, dict[str, Any]]], run: int) -> Counter[str]:
    """Sends per token up to `run`'s end (the next run may start before the test stops
    the processes: wakeup.interval is short here)."""
    [end] = [ev.parse_iso_ms(d["at"]) / 1000 for kind, d in log
             if kind == ev.RUN_FINISHED and d["run"] == run]
    return Counter(r.token for r in simulator.requests if r.received_at <= end)


def _stale_outcomes(log: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Outcomes whose epoch is not their shard's current one where they stand in the log."""
    current: dict[int, int] = {}
    stale = []
    for kind, d in log:
        if kind == ev.SHARD_LEASED:
            current[d["shard"]] = d["epoch"]
        elif kind in OUTCOMES and current.get(d["shard"]) != d["epoch"]:
            stale.append(d)
    return stale


def _stop_all(relays: list[RelayProcess]) -> None:
    for relay in relays:
        if relay.process.poll() is None:
            relay.signal(signal.SIGTERM)
    for relay in relays:
        assert relay.finish() in (0, -signal.SIGKILL), relay.log


def _shared_run(dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
                processes: list[RelayProcess], count: int, tokens: list[str], *,
                latency: float, window: int, lease_ttl: float = 2.0
                ) -> tuple[Any, list[RelayProcess]]:
    """`count` supervisors up and sharing the shards, then `tokens` registered; run 2 (the
    first after run 1 over the empty registry) is the one with the tokens."""
    simulator, apns = simulator_factory(latency=latency)
    relays = _start(processes, tmp_path, dsn, apns, count, lease_ttl=lease_ttl, interval=8,
                    max_in_flight=window)
    _wait_for("run 1 (empty) to finish", lambda: _run_finished(dsn, 1), relays)
    _wait_for("every process to hold shards", lambda: _live_members(dsn) == count, relays)
    register(dsn, tokens)
    return simulator, relays


def test_three_processes_share_a_run_each_token_gets_one_final_outcome(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess], capsys: pytest.CaptureFixture[str]) -> None:
    tokens = [token(i) for i in range(1, 5001)]
    simulator, relays = _shared_run(dsn, simulator_factory, tmp_path, processes, 3, tokens,
                                    latency=0.01, window=100)
    _wait_for("run 2 to finish", lambda: _run_finished(dsn, 2), relays)
    _stop_all(relays)

    log = events(dsn)
    assert finals(log, 2) == Counter(tokens), "exactly one final outcome per token"
    started = [d["run"] for kind, d in log if kind == ev.RUN_STARTED]
    # Run 3 may have started too (see _sent_in), but every run once, in order.
    assert started[:2] == [1, 2] and started == sorted(set(started)), started
    assert _sent_in(simulator, log, 2) == Counter(tokens), "no re-sends"
    drivers = _drivers(log, 2)
    assert len(drivers) == 3 and min(drivers.values()) > len(tokens) / 10, drivers
    assert _stale_outcomes(log) == []

    capsys.readouterr()
    assert audit_main(dsn, ["--json", "--verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    [run] = [r for r in report["runs"] if r["run"] == 2]
    shown = {p["process"]: len(p["shards"]) for p in run["processes"]}
    assert set(shown) == set(drivers) and sum(shown.values()) >= 64, run["processes"]


def test_kill_9_of_one_process_mid_run_the_others_take_over_and_finish(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    tokens = [token(i) for i in range(1, 3001)]
    window = 20
    simulator, relays = _shared_run(dsn, simulator_factory, tmp_path, processes, 3, tokens,
                                    latency=0.05, window=window)
    assert simulator.wait_for_requests(600, timeout=WAIT)
    victim = relays[1]
    victim.kill()
    killed_at = time.monotonic()
    _wait_for("run 2 to finish", lambda: _run_finished(dsn, 2), [relays[0], relays[2]])
    finished_after = time.monotonic() - killed_at
    _stop_all(relays)

    log = events(dsn)
    assert finals(log, 2) == Counter(tokens)
    sent = _sent_in(simulator, log, 2)
    resent = [t for t, n in sent.items() if n > 1]
    assert len(resent) <= window, f"{len(resent)} re-sends"
    assert max(sent.values()) <= 2
    took_over = [d for kind, d in log if kind == ev.SHARD_LEASED and d["took_from"] is not None]
    assert took_over, "the dead process's shards were taken over"
    assert _stale_outcomes(log) == []
    assert finished_after < WAIT
    assert audit_main(dsn, ["--verify"]) == 0


def test_a_process_frozen_past_its_lease_is_fenced_out_when_it_resumes(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    tokens = [token(i) for i in range(1, 2001)]
    simulator, relays = _shared_run(dsn, simulator_factory, tmp_path, processes, 2, tokens,
                                    latency=0.3, window=30)
    frozen = relays[1]
    assert simulator.wait_for_requests(200, timeout=WAIT)
    # Both processes sending right now (a process joins a run another started at its next
    # look, so the first 200 requests may all be one process's): each has its window in
    # flight, one connection each.
    _wait_for("both processes to be sending",
              lambda: len({r.connection for r in list(simulator.requests)[-100:]}) == 2, relays)
    frozen.signal(signal.SIGSTOP)  # with sends in flight: their answers wait in its socket
    # Frozen until the other process has taken every shard of it over (its lease, 2 s, ran
    # out): a fixed pause may end first on a loaded machine, and then the frozen process
    # just renews leases nobody took, and records its answers rightly.
    holder = _holder(dsn, frozen.process.pid)
    _wait_for("the other process to take the frozen one's shards over",
              lambda: _shards_held_by(dsn, holder) == 0, relays)
    frozen.signal(signal.SIGCONT)
    _wait_for("run 2 to finish", lambda: _run_finished(dsn, 2), relays)
    _wait_for("the late outcomes to be refused", lambda: "refused" in frozen.log, relays, 10)
    _stop_all(relays)

    log = events(dsn)
    assert finals(log, 2) == Counter(tokens), "exactly one final outcome per token"
    assert _stale_outcomes(log) == [], "an outcome from a stale epoch is in the log"
    assert "the lease moved to another process" in frozen.log
    assert audit_main(dsn, ["--verify"]) == 0


def test_two_processes_starting_the_same_due_run_at_once_start_one_run(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    """Both find the first run due as they start (the log has none): one starts it, the
    other joins it. (The same race, exactly at once, in threads: above.)"""
    simulator, apns = simulator_factory(latency=0.02)
    tokens = [token(i) for i in range(1, 1001)]
    register(dsn, tokens)
    configs = [_config(tmp_path, f"relay{i}", dsn, apns, lease_ttl=2.0, max_in_flight=20)[0]
               for i in range(2)]
    barrier = threading.Barrier(2)

    def launch(config: Path, name: str) -> RelayProcess:
        barrier.wait()
        return start_relay(processes, config, name=name)

    with ThreadPoolExecutor(2) as pool:
        relays = list(pool.map(launch, configs, ["relay0", "relay1"]))
    _wait_for("run 1 to finish", lambda: _run_finished(dsn, 1), relays)
    _stop_all(relays)
    log = events(dsn)
    assert [d["run"] for kind, d in log if kind == ev.RUN_STARTED] == [1]
    assert [d["run"] for kind, d in log if kind == ev.RUN_FINISHED] == [1]
    assert finals(log, 1) == Counter(tokens)
    assert Counter(r.token for r in simulator.requests) == Counter(tokens)
