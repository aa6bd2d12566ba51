"""`apns.processes`: the APNs client in child processes, over real TLS to the simulator."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections import Counter

import apns_fixtures
from apns_fixtures import SimulatorFactory, token

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
