"""The chaos soak, one minute of it: kills, freezes, signals, PostgreSQL outages and APNs
faults against one relay process and against two sharing the database, then the log and
the simulator are checked (bench/chaos.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("relays", [1, 2])
def test_a_one_minute_chaos_soak_has_no_violation(relays: int) -> None:
    soak = subprocess.run([sys.executable, "-m", "bench.chaos", "--minutes", "1", "--seed", "13",
                           "--relays", str(relays)],
                          capture_output=True, text=True, timeout=600)
    assert soak.returncode == 0, soak.stdout + soak.stderr
    assert "violations: 0" in soak.stdout
    injected = soak.stdout.split("faults: ", 1)[1].split(",", 1)[0]
    assert int(injected) >= 5, soak.stdout
