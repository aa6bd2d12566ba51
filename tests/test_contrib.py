"""contrib/: the systemd unit, the Containerfile, the Grafana dashboard and the alert rules,
each checked against the tool that reads it or against a live relay's /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import apns_fixtures
import psycopg
import pytest
import relay_fixtures
import yaml
from apns_fixtures import SimulatorFactory
from relay_fixtures import WAIT, RelayProcess, free_port, start_relay, wait_healthy, write_config

from relay.config import config_from_mapping, parse_listen

simulator_factory = apns_fixtures.simulator_factory
processes = relay_fixtures.processes

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "systemd" / "apns-relay.service"
RULES = CONTRIB / "prometheus" / "apns-relay.rules.yml"
RULE_TESTS = CONTRIB / "prometheus" / "apns-relay.rules.test.yml"
DASHBOARD = CONTRIB / "grafana" / "apns-relay.json"
# What Prometheus adds to every target itself.
SCRAPE_SERIES = {"up"}


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_restarts_crashes_not_halts_and_is_hardened() -> None:
    settings = _unit_settings()
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["9"]
    assert settings["User"] == ["apns-relay"]
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "true"),
                       ("PrivateTmp", "true"), ("ReadWritePaths", "/var/lib/apns-relay")):
        assert settings[key] == [value], key
    # the writable path is where the example configuration keeps its data
    example = yaml.safe_load((CONTRIB / "relay.yaml").read_text())
    assert example["database"]["data_dir"] == settings["ReadWritePaths"][0]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit is not verified here")
    # Only the installation prefix changes: systemd checks that ExecStart is executable.
    bindir = Path(sys.executable).parent
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/apns-relay/bin/apns-relay",
                                             str(bindir / "apns-relay")
                                             if (bindir / "apns-relay").exists()
                                             else sys.executable))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_promtool_passes_the_alert_rules_tests() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); the "
                    "rules' series are still checked against a live /metrics")
    done = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name],
                          cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _containerfile() -> list[tuple[str, str]]:
    text = (CONTRIB / "Containerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_container_installs_the_wheel_and_runs_unprivileged(tmp_path: Path) -> None:
    instructions = _containerfile()
    kinds = [kind for kind, _ in instructions]
    install = next(i for i, (kind, arg) in enumerate(instructions)
                   if kind == "RUN" and "pip install" in arg and ".whl" in arg)
    user = kinds.index("USER")
    assert install < user and instructions[user][1] not in ("root", "0")
    example = yaml.safe_load((CONTRIB / "relay.yaml").read_text())
    ports = {parse_listen(example["http"][key])[1] for key in ("listen", "metrics_listen")}
    assert {int(p) for p in dict(instructions)["EXPOSE"].split()} == ports
    api_port = parse_listen(example["http"]["listen"])[1]
    assert f"127.0.0.1:{api_port}/health" in dict(instructions)["HEALTHCHECK"]
    # the example configuration is valid (with a key file where it names one)
    key = tmp_path / "AuthKey.p8"
    key.write_text("a key")
    example["apns"]["key_file"] = str(key)
    config_from_mapping(example, "contrib/relay.yaml")


def _healthcheck_command(port: int) -> list[str]:
    healthcheck = dict(_containerfile())["HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    return [sys.executable if command[0] == "python" else command[0],
            *(arg.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for arg in command[1:])]


def _exposed(metrics_text: str) -> set[str]:
    """Every series name the exposition has or will have (a labelled family with no
    sample yet still declares its TYPE)."""
    names = set()
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created")}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            family = family.removesuffix("_total")  # a family with no sample yet
            names |= {family + suffix for suffix in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group())  # type: ignore[union-attr]
    return names


def series_names(expression: str) -> set[str]:
    """The series a PromQL expression reads: identifiers that are not functions, keywords,
    label names or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    keywords = {"and", "or", "unless", "bool"}
    return {name for name, call in re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?",
                                              text)
            if not call and name not in keywords}


def test_series_names_sees_through_promql() -> None:
    assert series_names('sum by (job, instance) (rate(relay_x_total{reason=~"a|b"}[15m]))'
                        ' / on(job) relay_y > 3 * relay_z offset 5m and up == 0') == {
        "relay_x_total", "relay_y", "relay_z", "up"}


def _wait_for_a_finished_run(dsn: str) -> None:
    deadline = time.monotonic() + WAIT
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM events WHERE type = 'run_finished'"
                               ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.1)
    raise AssertionError("no run finished")


def test_dashboard_alerts_and_healthcheck_match_a_live_relay(
        dsn: str, tmp_path: Path, simulator_factory: SimulatorFactory,
        processes: list[RelayProcess]) -> None:
    _, apns = simulator_factory()
    relay_fixtures.register(dsn, ["ab" * 32])  # so that the first run sends something
    port = free_port()
    relay = start_relay(processes, write_config(tmp_path, dsn, apns, port))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, relay)
    _wait_for_a_finished_run(dsn)
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        exposed = _exposed(answer.read().decode())

    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in series_names(target["expr"])}
    assert len(queried) >= 10
    assert queried <= exposed, f"the dashboard queries series no relay exposes: " \
                               f"{sorted(queried - exposed)}"

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    alerted = {name for rule in rules for name in series_names(rule["expr"])}
    assert {rule["alert"] for rule in rules} == {
        "ApnsRelayDown", "ApnsRelayBreakerOpenTooLong", "ApnsRelayDatabaseDown",
        "ApnsRelayRunOverdue", "ApnsRelayDeadTokenSpike"}
    assert alerted <= exposed | SCRAPE_SERIES, sorted(alerted - exposed - SCRAPE_SERIES)

    healthcheck = subprocess.run(_healthcheck_command(port), capture_output=True, text=True,
                                 timeout=30)
    assert healthcheck.returncode == 0, healthcheck.stderr
