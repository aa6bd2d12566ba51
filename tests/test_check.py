"""`python -m relay check`: configuration, database and APNs, without notifying anyone."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apns_fixtures
import psycopg
import pytest
import yaml
from apns_fixtures import SimulatorFactory
from psycopg import conninfo
from relay_fixtures import free_port

from relay.check import PROBE_TOKEN, CheckResult, run_checks
from relay.config import ApnsConfig
from relay.privilege import RUNTIME_GRANTS, rewrite_rights_of
from relay.simulator import ScriptedOutcome
from relay.simulator.cli import spawn
from relay.simulator.credentials import random_apple_id, write_signing_key

simulator_factory = apns_fixtures.simulator_factory


@pytest.fixture
def runtime_dsn(dsn: str) -> Iterator[str]:
    """`dsn` as a role that may only read the log and append to it (the runtime role)."""
    name = f"relay_runtime_{conninfo.conninfo_to_dict(dsn)['dbname']}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        for statement in RUNTIME_GRANTS:
            conn.execute(statement.format(role=f'"{name}"'))
    try:
        yield conninfo.make_conninfo(dsn, user=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
            conn.execute(f'DROP ROLE "{name}"')


def _config(directory: Path, dsn: str, apns: ApnsConfig, **apns_changes: Any) -> str:
    settings = {"endpoint": apns.endpoint, "ca_file": str(apns.ca_file), "topic": apns.topic,
                "key_file": str(apns.key_file), "key_id": apns.key_id,
                "team_id": apns.team_id, "request_timeout": "3s", **apns_changes}
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump({"database": {"dsn": dsn}, "apns": settings}))
    return str(path)


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


def _event_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
        assert row is not None
        return int(row[0])


def test_a_correct_configuration_passes_and_writes_nothing(
        runtime_dsn: str, dsn: str, simulator_factory: SimulatorFactory,
        tmp_path: Path) -> None:
    simulator, apns = simulator_factory()
    simulator.script(PROBE_TOKEN, [ScriptedOutcome(400, "BadDeviceToken")])
    path = _config(tmp_path, runtime_dsn, apns)
    done = subprocess.run([sys.executable, "-m", "relay", "-c", path, "check", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["configuration", "database", "apns"]
    apns_check = report["checks"][2]
    assert "400 BadDeviceToken" in apns_check["detail"]
    assert [r.token for r in simulator.requests] == [PROBE_TOKEN]  # one request, no device
    assert _event_count(dsn) == 0  # the probe is not a send


def test_a_simulator_that_accepts_every_token_passes_too(
        runtime_dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    results = _by_name(run_checks(_config(tmp_path, runtime_dsn, apns)))
    assert results["apns"].ok, results["apns"]
    assert "answered 200" in results["apns"].detail


def test_a_wrong_key_names_the_key_settings(
        runtime_dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    other_id = random_apple_id()
    other_key, _ = write_signing_key(tmp_path, other_id)
    path = _config(tmp_path, runtime_dsn, apns, key_file=str(other_key), key_id=other_id)
    done = subprocess.run([sys.executable, "-m", "relay", "-c", path, "check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    apns_lines = done.stdout.split("apns ", 1)[1]
    assert "PROBLEM" in apns_lines and "403 InvalidProviderToken" in apns_lines
    assert "fix: apns.key_file, apns.key_id and apns.team_id" in apns_lines


def test_a_wrong_topic_names_the_topic(
        runtime_dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    results = _by_name(run_checks(_config(tmp_path, runtime_dsn, apns,
                                          topic="org.example.other")))
    assert not results["apns"].ok
    assert "400 TopicDisallowed" in results["apns"].detail
    assert results["apns"].fix is not None and "apns.topic" in results["apns"].fix
    assert results["database"].ok and results["configuration"].ok


def test_an_unreachable_endpoint_names_the_endpoint(
        runtime_dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    nobody = f"https://127.0.0.1:{free_port()}"
    results = _by_name(run_checks(_config(tmp_path, runtime_dsn, apns, endpoint=nobody,
                                          request_timeout="1s")))
    assert not results["apns"].ok
    assert results["apns"].detail.startswith(f"no answer from {nobody}")
    assert "connect call failed" in results["apns"].detail.lower()
    assert results["apns"].fix is not None and "apns.endpoint" in results["apns"].fix


def test_a_superuser_runtime_role_is_a_problem(
        dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    results = _by_name(run_checks(_config(tmp_path, dsn, apns)))
    assert not results["database"].ok
    assert "is a superuser" in results["database"].detail


def test_rights_that_could_rewrite_the_log_are_each_named(runtime_dsn: str, dsn: str) -> None:
    role = conninfo.conninfo_to_dict(runtime_dsn)["user"]
    with psycopg.connect(runtime_dsn) as conn:
        assert rewrite_rights_of(conn) == []
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'GRANT UPDATE, TRUNCATE ON events TO "{role}"')
    with psycopg.connect(runtime_dsn) as conn:
        assert rewrite_rights_of(conn) == [f"role {role} may UPDATE, TRUNCATE events"]
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'REVOKE UPDATE, TRUNCATE ON events FROM "{role}"')
        admin.execute(f'ALTER TABLE events OWNER TO "{role}"')
    owns = f"role {role} owns events (ALTER, DROP, disable its triggers)"
    with psycopg.connect(runtime_dsn) as conn:
        assert rewrite_rights_of(conn)[0] == owns
    owner = f"{role}_owner"  # a member of the owner's role can SET ROLE to it
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{owner}" NOLOGIN')
        admin.execute(f'ALTER TABLE events OWNER TO "{owner}"')
        admin.execute(f'GRANT "{owner}" TO "{role}"')
    try:
        with psycopg.connect(runtime_dsn) as conn:
            assert rewrite_rights_of(conn)[0] == owns
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute('ALTER TABLE events OWNER TO CURRENT_USER')
            admin.execute(f'DROP ROLE "{owner}"')


def test_an_unmigrated_database_is_a_problem(
        empty_dsn: str, simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    results = _by_name(run_checks(_config(tmp_path, empty_dsn, apns)))
    assert not results["database"].ok
    assert "migrations not applied: 001_event_log.sql" in results["database"].detail
    assert results["database"].fix is not None and "migrate" in results["database"].fix


def test_an_unreachable_database_is_a_problem(
        simulator_factory: SimulatorFactory, tmp_path: Path) -> None:
    _, apns = simulator_factory()
    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/relay"
    results = _by_name(run_checks(_config(tmp_path, dsn, apns)))
    assert not results["database"].ok
    assert results["database"].detail.startswith("cannot connect")


def test_a_bad_configuration_is_named_and_nothing_else_is_tried(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("wakeup:\n  intervall: 1h\n")
    results = run_checks(str(path))
    assert [r.ok for r in results] == [False, False, False]
    assert "wakeup.intervall: unknown key" in results[0].detail
    assert results[1].detail == "not checked: the configuration is invalid"


def test_with_no_credentials_the_built_in_simulator_is_checked_and_named(
        runtime_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"database": {"dsn": runtime_dsn}}))
    results = _by_name(run_checks(str(path)))
    assert results["apns"].ok, results["apns"]
    assert results["apns"].detail.startswith("the built-in simulator answered 200")
    assert "NO NOTIFICATION LEAVES THIS MACHINE" in results["apns"].detail


def test_the_simulator_command_with_a_real_key_is_checked_like_apple(
        runtime_dsn: str, tmp_path: Path) -> None:
    """`python -m relay simulator --private-key-file` as an operator runs it."""
    key_id, team_id = random_apple_id(), random_apple_id()
    key_file, _ = write_signing_key(tmp_path, key_id)
    child, values = spawn(["--listen", "127.0.0.1:0", "--topic", "org.example.wallet",
                           "--key-id", key_id, "--team-id", team_id, "--private-key-file",
                           str(key_file), "--quiet", "--script",
                           f"{PROBE_TOKEN}=400:BadDeviceToken"], cwd=tmp_path)
    try:
        apns = ApnsConfig(endpoint=values["endpoint"], ca_file=Path(values["ca_file"]),
                          topic="org.example.wallet", key_file=key_file, key_id=key_id,
                          team_id=team_id)
        results = _by_name(run_checks(_config(tmp_path, runtime_dsn, apns)))
    finally:
        child.terminate()
        child.wait(30)
    assert all(result.ok for result in results.values()), results
    assert "answered 400 BadDeviceToken" in results["apns"].detail
