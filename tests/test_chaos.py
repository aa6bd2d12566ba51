"""The chaos soak, one minute of it: kills, signals, PostgreSQL outages and APNs faults
against the relay as a process, then the log and the simulator are checked (bench/chaos.py)."""

from __future__ import annotations

import subprocess
import sys


def test_a_one_minute_chaos_soak_has_no_violation() -> None:
    soak = subprocess.run([sys.executable, "-m", "bench.chaos", "--minutes", "1", "--seed", "13"],
                          capture_output=True, text=True, timeout=600)
    assert soak.returncode == 0, soak.stdout + soak.stderr
    assert "violations: 0" in soak.stdout
    injected = soak.stdout.split("faults: ", 1)[1].split(",", 1)[0]
    assert int(injected) >= 5, soak.stdout
