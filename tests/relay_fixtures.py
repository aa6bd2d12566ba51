"""Helpers for tests of the relay as a whole: its processes, its API and its event log.

Use from any test module (pytest puts `tests/` on sys.path)::

    import relay_fixtures
    from relay_fixtures import RelayProcess, start_relay, write_config

    processes = relay_fixtures.processes  # the fixture, visible to pytest here
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from events import types as ev
from events.journal import Journal
from relay.config import ApnsConfig

WAIT = 60.0
FINAL_TYPES = (ev.NOTIFICATION_DELIVERED, ev.NOTIFICATION_ABANDONED)


# --- the relay as a process ------------------------------------------------------------

def free_port() -> int:
    """A port free a moment ago, for a relay's `http.listen`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, dsn: str, apns: ApnsConfig, port: int,
                  **wakeup: Any) -> Path:
    """A configuration reaching `dsn` and the simulator, with short back-off for tests and
    `http.request_timeout` 1 s (a registration the database cannot take gets its 503 soon)."""
    settings = {"interval": 3600, "backoff_base": 0.05, "backoff_max": 0.2,
                "progress_interval": 0.2, **wakeup}
    raw = {
        "database": {"dsn": dsn, "data_dir": str(directory)},
        "http": {"listen": f"127.0.0.1:{port}", "request_timeout": 1},
        "apns": {"endpoint": apns.endpoint, "ca_file": str(apns.ca_file), "topic": apns.topic,
                 "key_file": str(apns.key_file), "key_id": apns.key_id,
                 "team_id": apns.team_id},
        "wakeup": settings,
    }
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class RelayProcess:
    """`python -m relay -c CONFIG [command]`, its output in a file (never a full pipe)."""

    def __init__(self, config: Path, *command: str, output: Path) -> None:
        self.output = output
        with output.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "-c", str(config), *command],
                stdout=sink, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.output.read_text()

    def finish(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    """Relay processes a test starts: none outlives it."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.kill()


def start_relay(processes: list[RelayProcess], config: Path, *command: str,
                name: str = "relay") -> RelayProcess:
    """Started beside `config`, its output in `<name>.log` there."""
    relay = RelayProcess(config, *command, output=config.parent / f"{name}.log")
    processes.append(relay)
    return relay


def api_request(url: str, method: str = "GET",
                body: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """(status, headers) of one API request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def wait_healthy(base_url: str, relay: RelayProcess) -> None:
    """Until `GET /health` answers 200: the API serves and the wakeup worker runs."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert relay.process.poll() is None, relay.log
        try:
            if api_request(f"{base_url}/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"the relay never became healthy:\n{relay.log}")


# --- the log -----------------------------------------------------------------------------

def register(dsn: str, tokens: list[str]) -> None:
    """Registered a minute ago, straight into the log (as if through the API)."""
    journal = Journal(dsn)
    journal.start()
    try:
        at = ev.now_ms() - 60_000
        journal.append([ev.device_registered(t, at) for t in tokens]).result(WAIT)
    finally:
        journal.stop(timeout=10)


def events(dsn: str) -> list[tuple[str, dict[str, Any]]]:
    """(type, body) of every event, in log order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT type, body FROM events ORDER BY position").fetchall()
    return [(kind, json.loads(bytes(body))) for kind, body in rows]


def finals(log: list[tuple[str, dict[str, Any]]], run: int) -> Counter[str]:
    """Final outcomes per token in `run` (a dead-token failure is final too)."""
    return Counter(
        data["token"] for kind, data in log
        if data.get("run") == run and (kind in FINAL_TYPES or (
            kind == ev.NOTIFICATION_FAILED and data["verdict"] == "dead_token")))
