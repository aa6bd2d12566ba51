"""The relay as an operator runs it: `python -m relay` and `python -m relay wakeup` as processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg

TOKEN = "0123456789ABCDEF0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise AssertionError("the relay never became healthy")


def _wait_first_run(dsn: str, timeout: float = 60) -> None:
    """The supervisor runs a wakeup at start; let it finish so the token is not part of it."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM events WHERE type = 'run_finished'").fetchone()
            if row and row[0] >= 1:
                return
            time.sleep(0.1)
    raise AssertionError("the supervisor's first run never finished")


def test_register_then_wakeup_delivers_exactly_once(dsn: str, tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(f"database:\n  dsn: '{dsn}'\nhttp:\n  listen: 127.0.0.1:{port}\n"
                      "wakeup:\n  interval: 1h\n")
    url = f"http://127.0.0.1:{port}"
    supervisor = subprocess.Popen([sys.executable, "-m", "relay", "-c", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, supervisor)
        _wait_first_run(dsn)
        request = urllib.request.Request(
            f"{url}/devices", data=json.dumps({"token": TOKEN}).encode(), method="POST",
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        wakeup = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "wakeup"],
                                capture_output=True, text=True, timeout=120)
        assert wakeup.returncode == 0, wakeup.stderr
        assert "NO NOTIFICATION LEAVES THIS MACHINE" in wakeup.stderr
    finally:
        supervisor.send_signal(signal.SIGTERM)
        output, _ = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, output
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT type, token FROM events WHERE type IN "
            "('device_registered', 'notification_delivered', 'run_started', 'run_finished') "
            "ORDER BY position").fetchall()
    delivered = [token for kind, token in rows if kind == "notification_delivered"]
    assert delivered == [TOKEN.lower()]
    assert [kind for kind, _ in rows].count("run_started") == 2  # the supervisor's, the wakeup's
    assert [kind for kind, _ in rows].count("run_finished") == 2
