"""`logging.format: json`: one JSON object per line, with the structured fields."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import apns_fixtures
import relay_fixtures
import yaml
from apns_fixtures import SimulatorFactory
from relay_fixtures import RelayProcess, free_port, start_relay, write_config

from relay.logs import JsonFormatter
from relay.simulator import ScriptedOutcome
from relay.tokens import redact

simulator_factory = apns_fixtures.simulator_factory
processes = relay_fixtures.processes

TOKEN = "cd" * 32


def test_a_record_is_one_line_with_its_fields_and_the_token_redacted() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "two\nlines %s",
                                   ("here",), sys.exc_info())
    record.run, record.token, record.status, record.reason = 7, TOKEN, 410, "Unregistered"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and doc["logger"] == "relay.x"
    assert doc["message"] == "two\nlines here"
    assert doc["time"].endswith("Z")
    assert (doc["run"], doc["token"], doc["status"], doc["reason"]) == (
        7, redact(TOKEN), 410, "Unregistered")
    assert "ValueError: boom" in doc["exception"]


def test_the_progress_line_and_the_halt_carry_the_fields(
        dsn: str, tmp_path: Path, simulator_factory: SimulatorFactory,
        processes: list[RelayProcess]) -> None:
    simulator, apns = simulator_factory()
    simulator.script(TOKEN, [ScriptedOutcome(400, "TopicDisallowed")])
    relay_fixtures.register(dsn, [TOKEN])
    config = write_config(tmp_path, dsn, apns, free_port())
    raw = yaml.safe_load(config.read_text())
    raw["logging"] = {"format": "json"}
    config.write_text(yaml.safe_dump(raw))
    relay = start_relay(processes, config, "wakeup")
    assert relay.finish() == 9, relay.log
    lines = [json.loads(line) for line in relay.log.splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    progress = next(line for line in lines if line["message"].startswith("run 1: "))
    assert (progress["run"], progress["total"]) == (1, 1)
    assert {"done", "rate"} <= progress.keys()
    halt = next(line for line in lines if line["message"].startswith("HALTED"))
    assert halt["level"] == "CRITICAL"
    assert (halt["run"], halt["token"], halt["status"], halt["reason"]) == (
        1, redact(TOKEN), 400, "TopicDisallowed")
    assert TOKEN not in relay.log
