"""The relay as an operator runs it: `python -m relay` and `python -m relay wakeup` as processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
import relay_fixtures
from relay_fixtures import (
    WAIT,
    RelayProcess,
    api_request,
    free_port,
    start_relay,
    wait_healthy,
)

processes = relay_fixtures.processes

TOKEN = "0123456789ABCDEF0123456789abcdef"


def _wait_first_run(dsn: str) -> None:
    """The supervisor runs a wakeup at start; let it finish so the token is not part of it."""
    deadline = time.monotonic() + WAIT
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM events WHERE type = 'run_finished'").fetchone()
            if row and row[0] >= 1:
                return
            time.sleep(0.1)
    raise AssertionError("the supervisor's first run never finished")


def _checkpoint_served(url: str) -> dict[str, object]:
    """GET /log/checkpoint once the supervisor has signed one (503 until then)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(f"{url}/log/checkpoint", timeout=10) as answer:
                return dict(json.load(answer))
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and time.monotonic() < deadline
            time.sleep(0.1)


def test_register_then_wakeup_delivers_exactly_once(
        dsn: str, tmp_path: Path, processes: list[RelayProcess]) -> None:
    """On the embedded defaults for APNs: the relay's own simulator, and it says so."""
    port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(f"database:\n  dsn: '{dsn}'\n  data_dir: '{tmp_path}'\n"
                      f"http:\n  listen: 127.0.0.1:{port}\nwakeup:\n  interval: 1h\n")
    url = f"http://127.0.0.1:{port}"
    supervisor = start_relay(processes, config, name="supervisor")
    wait_healthy(url, supervisor)
    _wait_first_run(dsn)
    assert api_request(f"{url}/devices", "POST", {"token": TOKEN})[0] == 200
    with urllib.request.urlopen(f"{url}/config", timeout=10) as answer:
        served = json.load(answer)
    assert served["environment"] == "simulator"
    assert served["endpoint"].startswith("https://127.0.0.1:")
    # The first run is over: its signed checkpoint is served and kept in the data dir.
    served_checkpoint = _checkpoint_served(url)
    kept = tmp_path / "checkpoints" / f"checkpoint-{served_checkpoint['position']:012d}.json"
    assert json.loads(kept.read_text()) == served_checkpoint
    wakeup = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "wakeup"],
                            capture_output=True, text=True, timeout=120)
    assert wakeup.returncode == 0, wakeup.stderr
    assert "NO NOTIFICATION LEAVES THIS MACHINE" in wakeup.stderr
    supervisor.signal(signal.SIGTERM)
    assert supervisor.finish() == 0, supervisor.log

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT type, token FROM events WHERE type IN "
            "('device_registered', 'notification_delivered', 'run_started', 'run_finished') "
            "ORDER BY position").fetchall()
    delivered = [token for kind, token in rows if kind == "notification_delivered"]
    assert delivered == [TOKEN.lower()]
    assert [kind for kind, _ in rows].count("run_started") == 2  # the supervisor's, the wakeup's
    assert [kind for kind, _ in rows].count("run_finished") == 2
    audit = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "audit",
                            "--checkpoint", str(tmp_path / "checkpoints")],
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "SIMULATED (built-in APNs simulator at https://127.0.0.1:" in audit.stdout
    assert "every checkpoint given" in audit.stdout


def test_audit_help_and_usage_errors_never_reach_the_database(tmp_path: Path) -> None:
    """A DSN that nothing answers: had the command connected, it would fail otherwise."""
    config = tmp_path / "relay.yaml"
    config.write_text("database:\n  dsn: 'postgresql://relay@127.0.0.1:9/nowhere'\n")

    def relay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "-c", str(config), *args],
                              capture_output=True, text=True, timeout=WAIT)

    for command in ("audit", "rebuild"):
        shown = relay(command, "--help")
        assert (shown.returncode, shown.stdout.startswith(f"usage: python -m relay {command}")
                ) == (0, True), shown.stderr
    for args, problem in ((["--jobs", "0"], "argument --jobs: expected a whole number"),
                          (["--token", "xyz"], "argument --token: token must contain only hex"),
                          (["--until", "soon"], "argument --until: expected an ISO 8601 time")):
        refused = relay("audit", *args)
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr


def test_an_unreachable_database_is_not_a_failed_audit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Exit 1 tells an auditor the log is wrong; a database out of reach must not say so."""
    from relay import environment
    from relay.__main__ import run_command
    from relay.config import load_config
    from relay.exits import ExitStatus

    config = tmp_path / "relay.yaml"
    config.write_text("database:\n  dsn: 'postgresql://relay@127.0.0.1:9/nowhere'\n")
    monkeypatch.setattr(environment, "DATABASE_WAIT", 0.5)
    assert run_command("audit", load_config(str(config)), ["--verify"]) == ExitStatus.UNAVAILABLE
    assert "cannot reach the database" in caplog.text
