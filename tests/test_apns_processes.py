"""`apns.processes`: the APNs client in child processes, over real TLS to the simulator."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import apns_fixtures
from apns_fixtures import SimulatorFactory, metric_value, token

from relay.apns import ApnsClient, Verdict
from relay.apns.client import TRANSPORT_RESENDS
from relay.apns.processes import LOST, ApnsProcessPool, open_client
from relay.simulator import Action, ScriptedOutcome

simulator_factory = apns_fixtures.simulator_factory  # the fixture, visible to pytest here

WAIT = 30.0


def test_open_client_runs_in_process_unless_asked(simulator_factory: SimulatorFactory) -> None:
    _, config = simulator_factory()
    assert isinstance(open_client(config, expiration=3600), ApnsClient)
    pool = open_client(dataclasses.replace(config, processes=2), expiration=3600)
    assert isinstance(pool, ApnsProcessPool)


def test_children_send_and_the_parent_gets_every_answer(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    dead, flaky = token(7), token(8)
    simulator.script(dead, [ScriptedOutcome(410, "Unregistered", 1_700_000_000_000)])
    simulator.script(flaky, ScriptedOutcome.failures(1))
    pool = ApnsProcessPool(config, expiration=3600, processes=2)
    pool.start()
    try:
        ids = {token(n): str(uuid.uuid4()) for n in range(300)}
        futures = [pool.send(t, apns_id) for t, apns_id in ids.items()]
        results = [future.result(WAIT) for future in futures]
    finally:
        pool.close()
    assert [(r.token, r.apns_id) for r in results] == list(ids.items())
    by_token = {r.token: r for r in results}
    assert by_token[dead].verdict is Verdict.DEAD_TOKEN
    assert by_token[dead].timestamp_ms == 1_700_000_000_000
    assert by_token[flaky].status == 503 and by_token[flaky].verdict is Verdict.TRANSIENT
    assert Counter(r.status for r in results) == Counter({200: 298, 410: 1, 503: 1})
    assert simulator.connections_opened == 2  # one per child, each with its own token


def test_a_child_that_dies_costs_no_attempt_and_send_never_waits_for_its_restart(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    held = token(1)
    simulator.script(held, [ScriptedOutcome(action=Action.WITHHOLD)])
    pool = ApnsProcessPool(config, expiration=3600, processes=1)
    pool.start()
    try:
        assert pool.send(token(0), str(uuid.uuid4())).result(WAIT).status == 200
        unanswered = pool.send(held, str(uuid.uuid4()))
        simulator.wait_for_requests(2)
        child = pool._children[0].process
        assert child is not None
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while pool.alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        meanwhile = pool.send(token(5), str(uuid.uuid4()))  # no child: it waits, not fails
        assert not unanswered.done() and not meanwhile.done()
        assert "exit code -9" in pool.last_exit
        pool.restart()  # what the supervisor's watch does, within its restart budget
        assert pool.alive() and pool._children[0].process is not child
        assert unanswered.result(WAIT).status == 200, "sent again, no attempt lost"
        assert meanwhile.result(WAIT).status == 200
        assert Counter(r.token for r in simulator.requests)[held] == 2
    finally:
        pool.close()


def test_a_send_that_keeps_killing_children_ends_as_lost(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    killer = token(9)
    simulator.script(killer, [ScriptedOutcome(action=Action.WITHHOLD)] * 10)
    pool = ApnsProcessPool(config, expiration=3600, processes=2)
    pool.start()
    try:
        future = pool.send(killer, str(uuid.uuid4()))
        for kills in range(1, TRANSPORT_RESENDS + 2):
            assert simulator.wait_for_requests(kills, timeout=WAIT)
            [holder] = [c for c in pool._children if c.pending]
            assert holder.process is not None
            os.kill(holder.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + WAIT
            while pool.alive():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            pool.restart()
        result = future.result(WAIT)
        assert (result.status, result.reason, result.verdict) == (None, LOST, Verdict.TRANSIENT)
        assert pool.send(token(2), str(uuid.uuid4())).result(WAIT).status == 200
    finally:
        pool.close()


def test_close_answers_what_is_still_unanswered(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    held = token(3)
    simulator.script(held, [ScriptedOutcome(action=Action.WITHHOLD)])
    pool = ApnsProcessPool(config, expiration=3600, processes=1)
    pool.start()
    unanswered = pool.send(held, str(uuid.uuid4()))
    simulator.wait_for_requests(1)
    pool.close()
    result = unanswered.result(WAIT)
    assert (result.status, result.reason) == (None, "Closed")
    after = pool.send(token(4), str(uuid.uuid4())).result(WAIT)
    assert (after.status, after.reason) == (None, "Closed")


class _ThreadProcess:
    """A 'child process' that is a thread of this process: its client would count into
    the same metrics registry as the pool, so a count in the child would show twice."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str, daemon: bool) -> None:
        # The child's end of the pipe, duplicated as a process would inherit it: the pool
        # closes its own copy once the child is started.
        conn, *rest = args
        args = (Connection(os.dup(conn.fileno())), *rest)
        self._thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
        self.pid, self.exitcode = os.getpid(), None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.exitcode = 0

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        raise AssertionError("a thread cannot be killed")


class _ThreadContext:
    def Pipe(self) -> tuple[Connection, Connection]:
        return multiprocessing.Pipe()

    Process = _ThreadProcess


def test_with_processes_each_send_is_counted_once(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(410, "Unregistered")])

    delivered = metric_value("relay_apns_sends_total", {"status": "200", "reason": ""})
    unregistered = metric_value("relay_apns_sends_total",
                                {"status": "410", "reason": "Unregistered"})
    pool = ApnsProcessPool(config, expiration=3600, processes=2)
    pool._context = _ThreadContext()  # type: ignore[assignment]
    pool.start()
    try:
        futures = [pool.send(token(n), str(uuid.uuid4())) for n in range(50)]
        assert all(future.result(WAIT).status in (200, 410) for future in futures)
    finally:
        pool.close()
    assert metric_value("relay_apns_sends_total", {"status": "200", "reason": ""}) == delivered + 49
    assert metric_value("relay_apns_sends_total",
                  {"status": "410", "reason": "Unregistered"}) == unregistered + 1
    assert metric_value("relay_apns_sends_in_flight") == 0
