"""Least privilege: with an owner role configured, the relay's own role can append to the
log but not rewrite it, and the relay refuses a runtime role that could."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from events import types as ev
from events.audit import audit_main
from events.journal import Journal
from relay import environment, privilege
from relay.config import Config, DatabaseConfig
from relay.database import EmbeddedPostgres, _open_lock, apply_migrations

T0 = 1_760_000_000_000


def as_role(dsn: str, role: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["user"] = role
    return conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


@pytest.fixture
def runtime_role(dsn: str) -> Iterator[str]:
    """A role of this test's own (roles are cluster-wide: named after the database)."""
    name = "rt_" + str(conninfo.conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{name}"')
        conn.execute(f'DROP ROLE "{name}"')


def config(dsn: str, owner: str | None, data_dir: Path) -> Config:
    return Config(database=DatabaseConfig(dsn=dsn, owner_dsn=owner, data_dir=data_dir))


def test_a_runtime_role_with_the_grants_appends_but_cannot_rewrite(
        dsn: str, runtime_role: str, tmp_path: Path) -> None:
    runtime = as_role(dsn, runtime_role)
    with environment.database_access(config(runtime, dsn, tmp_path)) as access:
        assert access.rewrite_rights == [] and access.warnings == []
    journal = Journal(runtime)
    journal.start()
    try:
        assert journal.append([ev.device_registered("aa" * 32, T0)]).result(10) == [1]
    finally:
        journal.stop(5)
    with psycopg.connect(runtime, autocommit=True) as conn:
        for attack in ("UPDATE events SET body = body",
                       "DELETE FROM events",
                       "TRUNCATE events",
                       "ALTER TABLE events DISABLE TRIGGER events_append_only",
                       "UPDATE log_head SET position = 0",
                       "DROP TABLE events"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attack)
    assert audit_main(runtime, ["--verify"]) == 0


def test_an_owner_configured_with_a_runtime_role_that_can_rewrite_refuses_to_start(
        dsn: str, tmp_path: Path) -> None:
    with pytest.raises(privilege.PrivilegeError, match="superuser"), \
            environment.database_access(config(dsn, dsn, tmp_path)):
        pass
    relay_yaml = tmp_path / "relay.yaml"
    relay_yaml.write_text(f"database:\n  dsn: '{dsn}'\n  owner_dsn: '{dsn}'\n"
                          f"  data_dir: '{tmp_path}'\n")
    done = subprocess.run([sys.executable, "-m", "relay", "-c", str(relay_yaml), "wakeup"],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 2
    critical = [line for line in done.stderr.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1 and "can rewrite the event log" in critical[0]


def test_a_role_owning_the_log_or_holding_rewrite_rights_is_named(
        dsn: str, runtime_role: str) -> None:
    runtime = as_role(dsn, runtime_role)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'GRANT DELETE ON events TO "{runtime_role}"')
        conn.execute(f'GRANT UPDATE (hash) ON log_head TO "{runtime_role}"')
    assert privilege.rewrite_rights(runtime) == [
        f"role {runtime_role} may DELETE events",
        f"role {runtime_role} may UPDATE log_head"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE events OWNER TO "{runtime_role}"')
    assert privilege.rewrite_rights(runtime)[0].endswith(
        "owns events (ALTER, DROP, disable its triggers)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE events OWNER TO CURRENT_USER")


def test_without_an_owner_the_relay_warns_and_the_audit_says_so(
        dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with environment.database_access(config(dsn, None, tmp_path)) as access:
        assert access.warnings and "can rewrite the log" in access.warnings[0]
    capsys.readouterr()
    assert audit_main(dsn, ["--verify"], warnings=access.warnings) == 0
    assert "WARNING       the runtime role can rewrite the log" in capsys.readouterr().out


def test_the_readme_lists_the_grants_the_relay_applies() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for statement in privilege.RUNTIME_GRANTS:
        assert statement.format(role="relay") + ";" in readme


def test_the_embedded_server_runs_the_relay_as_a_role_that_owns_nothing() -> None:
    directory = Path(tempfile.mkdtemp(prefix="relay-privilege-"))
    directory.chmod(0o755)
    server = EmbeddedPostgres(directory)
    try:
        owner, runtime = server.relay_roles(server.start())
        apply_migrations(owner)
        privilege.grant_runtime(owner, privilege.current_role(runtime))
        assert privilege.rewrite_rights(runtime) == []
        assert privilege.rewrite_rights(owner) != []
        socket = next(server.pgdata.glob(".s.PGSQL.*"))
        assert socket.stat().st_mode & 0o077 == 0, "no other OS user may connect"
        assert server.pgdata.stat().st_mode & 0o077 == 0
        if os.geteuid() == 0:
            assert server.pgdata.owner() == "apns-relay"
    finally:
        server.stop()
    planted = directory / "planted.lock"
    planted.symlink_to(directory / "target")
    with pytest.raises(OSError):
        _open_lock(planted)
    assert not (directory / "target").exists()

