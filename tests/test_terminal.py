"""What an operator reads: `relay wakeup` and the supervisor as processes, their whole output.

Every log line a sentence (no dataclass reprs), the run's last progress line once, and no
whole device token in any line, in either log format, even after a halt (whose event in
the log does carry the token: the log is the record, the terminal is not).
"""

from __future__ import annotations

from pathlib import Path

import apns_fixtures
import pytest
import relay_fixtures
import yaml
from apns_fixtures import SimulatorFactory, token
from relay_fixtures import RelayProcess, free_port, register, start_relay, write_config
from relay_fixtures import events as read_events

from events import types as ev
from relay.exits import ExitStatus
from relay.simulator import ScriptedOutcome

simulator_factory = apns_fixtures.simulator_factory
processes = relay_fixtures.processes


def _config(directory: Path, dsn: str, apns: object, log_format: str) -> Path:
    path = write_config(directory, dsn, apns, free_port())  # type: ignore[arg-type]
    raw = yaml.safe_load(path.read_text())
    raw["logging"] = {"level": "DEBUG", "format": log_format}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(("command", "reason", "status"), [
    (("wakeup",), "InvalidProviderToken", 403),
    ((), "BadTopic", 400),
], ids=["wakeup-InvalidProviderToken", "supervisor-BadTopic"])
def test_no_log_line_of_a_halted_run_carries_a_whole_token(
        command: tuple[str, ...], reason: str, status: int, log_format: str, dsn: str,
        simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    simulator, apns = simulator_factory()
    tokens = [token(i) for i in range(1, 4)]
    halting = tokens[1]
    simulator.script(halting, [ScriptedOutcome(status, reason)])
    register(dsn, tokens)
    relay = start_relay(processes, _config(tmp_path, dsn, apns, log_format), *command)
    assert relay.finish() == ExitStatus.HALTED, relay.log
    halted = [d for kind, d in read_events(dsn) if kind == ev.RELAY_HALTED]
    assert [d["token"] for d in halted] == [halting]  # the log keeps it whole
    output = relay.log
    assert reason in output and "HALTED" in output
    for whole in tokens:
        assert whole not in output, f"a log line carries the whole token {whole}"
    assert "RunResult(" not in output and "HaltInfo(" not in output


def test_a_one_token_wakeup_says_its_last_progress_line_once_and_ends_in_a_sentence(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path,
        processes: list[RelayProcess]) -> None:
    _, apns = simulator_factory()
    register(dsn, [token(1)])
    relay = start_relay(processes, _config(tmp_path, dsn, apns, "text"), "wakeup")
    assert relay.finish() == ExitStatus.OK, relay.log
    output = relay.log
    assert output.count("1/1 tokens done") == 1, output
    assert "RunResult(" not in output
    assert "wakeup: run 1 finished: 1 tokens, 1 delivered" in output, output
