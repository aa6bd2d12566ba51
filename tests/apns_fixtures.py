"""Test helpers: an APNs simulator and the ApnsConfig that reaches it.

Use from any test module (pytest puts `tests/` on sys.path):

    import apns_fixtures
    from apns_fixtures import TOPIC, SimulatorFactory, running_client, token

    simulator_factory = apns_fixtures.simulator_factory  # the fixture, visible to pytest here

    def test_something(simulator_factory):
        simulator, config = simulator_factory(latency=0.01)       # started; stopped after the test
        client = ApnsClient(config, expiration=3600); client.start()
        ...

`simulator_factory(**options)` takes every `ApnsSimulator` option (faults, `clock`,
`max_concurrent_streams`, ...) plus `config` (a dict of ApnsConfig overrides such as
`{"request_timeout": 0.5}`). Each simulator gets a fresh P-256 key written to a
`.p8` file under the test's tmp_path. `running_client(config)` is a context manager
for a started ApnsClient. For code outside pytest use `relay.simulator.embedded_simulator`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import metrics
from relay.apns import ApnsClient
from relay.config import ApnsConfig
from relay.simulator import ApnsSimulator
from relay.simulator.credentials import random_apple_id, write_signing_key

TOPIC = "org.example.wallet"

SimulatorFactory = Callable[..., tuple[ApnsSimulator, ApnsConfig]]


def token(n: int) -> str:
    """A distinct, valid 32-byte device token."""
    return f"{n:064x}"


def start_simulator(directory: Path, *, topic: str = TOPIC, config: dict[str, Any] | None = None,
                    **options: Any) -> tuple[ApnsSimulator, ApnsConfig]:
    """A started simulator trusting a fresh key in `directory`, and a config for it."""
    key_id, team_id = random_apple_id(), random_apple_id()
    key_file, public_key = write_signing_key(directory, key_id)
    simulator = ApnsSimulator(topic=topic, keys={key_id: (team_id, public_key)}, **options)
    simulator.start()
    apns = ApnsConfig(endpoint=simulator.url, ca_file=simulator.ca_file, topic=topic,
                      key_file=key_file, key_id=key_id, team_id=team_id,
                      request_timeout=10.0, connect_timeout=5.0)
    return simulator, dataclasses.replace(apns, **(config or {}))


@pytest.fixture
def simulator_factory(tmp_path: Path) -> Iterator[SimulatorFactory]:
    """Call it to start simulators (each with its own key); all stop after the test."""
    started: list[ApnsSimulator] = []

    def make(**options: Any) -> tuple[ApnsSimulator, ApnsConfig]:
        directory = tmp_path / f"apns-{len(started)}"
        directory.mkdir()
        simulator, config = start_simulator(directory, **options)
        started.append(simulator)
        return simulator, config

    yield make
    for simulator in started:
        simulator.stop()


@contextlib.contextmanager
def running_client(config: ApnsConfig, *, expiration: float = 3600.0,
                   **options: Any) -> Iterator[ApnsClient]:
    """A started ApnsClient, closed on exit."""
    client = ApnsClient(config, expiration=expiration, **options)
    client.start()
    try:
        yield client
    finally:
        client.close()


def metric_value(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the relay's metrics registry (0 when the series has none yet)."""
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0
