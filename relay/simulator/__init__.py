"""The project's APNs simulator: Apple's provider API on loopback, for tests and operators."""

from __future__ import annotations

from typing import Any

from relay.config import ApnsConfig
from relay.simulator.credentials import random_apple_id, write_signing_key
from relay.simulator.outcomes import Action, RecordedRequest, ScriptedOutcome
from relay.simulator.server import ApnsSimulator

__all__ = ["Action", "ApnsSimulator", "RecordedRequest", "ScriptedOutcome", "embedded_simulator"]


def embedded_simulator(topic: str, **options: Any) -> tuple[ApnsSimulator, ApnsConfig]:
    """A started simulator on 127.0.0.1 and the ApnsConfig that reaches it.

    Used when no APNs credentials are configured: a fresh P-256 key (written as a
    `.p8` into the simulator's private temporary directory), random key and team
    ids, and a certificate authority of its own. `stop()` removes all of it.
    `options` are passed to `ApnsSimulator` (faults, limits, clock).
    """
    simulator = ApnsSimulator(topic=topic, **options)
    key_id, team_id = random_apple_id(), random_apple_id()
    key_file, public_key = write_signing_key(simulator.workdir, key_id)
    simulator.add_key(key_id, team_id, public_key)
    simulator.start()
    config = ApnsConfig(endpoint=simulator.url, ca_file=simulator.ca_file, topic=topic,
                        key_file=key_file, key_id=key_id, team_id=team_id)
    return simulator, config
