"""`apns.processes`: the APNs client in child processes, over real TLS to the simulator."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections import Counter

import apns_fixtures
import pytest
from apns_fixtures import SimulatorFactory, token

from relay.apns import ApnsClient, Verdict, processes
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


def test_a_child_that_dies_loses_only_its_sends_and_comes_back(
        simulator_factory: SimulatorFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "RESTART_DELAY", 3.0)
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
        lost = unanswered.result(WAIT)
        assert (lost.status, lost.reason, lost.verdict) == (None, LOST, Verdict.TRANSIENT)
        meanwhile = pool.send(token(5), str(uuid.uuid4())).result(WAIT)  # no child to take it
        assert (meanwhile.status, meanwhile.reason) == (None, LOST)
        deadline = time.monotonic() + WAIT
        while pool._children[0].process is child and time.monotonic() < deadline:
            time.sleep(0.05)
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
