"""Migrations and the embedded server, on real PostgreSQL."""

from __future__ import annotations

import itertools
import random
import shutil
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

from relay.database import (
    EmbeddedPostgres,
    RetryPauses,
    apply_migrations,
    first_line,
    is_transient,
    migrations,
)


def test_migrations_are_numbered_and_shipped() -> None:
    names = [name for name, _ in migrations()]
    assert names, "schema/ ships no migration"
    assert all(name[:3].isdigit() and name[3] == "_" for name in names)
    assert len({name[:3] for name in names}) == len(names), "two migrations share a number"


def test_concurrent_starts_apply_each_migration_once(empty_dsn: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(apply_migrations(empty_dsn))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    applied = sorted(name for result in results for name in result)
    assert applied == sorted(name for name, _ in migrations())
    assert apply_migrations(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(migrations()),)


def test_embedded_server_is_shared_and_stopped_by_the_last_user() -> None:
    # Not pytest's tmp_path: it is private to root, and the server runs unprivileged.
    directory = Path(tempfile.mkdtemp(prefix="relay-embedded-"))
    directory.chmod(0o755)
    first, second = EmbeddedPostgres(directory), EmbeddedPostgres(directory)
    dsn = first.start()
    assert second.start() == dsn
    first.stop()
    with psycopg.connect(dsn) as conn:  # still served for the second user
        assert conn.execute("SELECT 1").fetchone() == (1,)
    second.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    shutil.rmtree(directory, ignore_errors=True)


def test_retry_pauses_jitter_from_400_ms_up_to_30_s_and_start_over_after_a_success() -> None:
    pauses = RetryPauses(random.Random(7))
    drawn = [pauses.next() for _ in range(40)]
    assert drawn[0] == 0.4
    for last, pause in itertools.pairwise(drawn):
        assert 0.4 <= pause <= min(30.0, last * 3)
    assert max(drawn) == 30.0  # they grow to the cap...
    below_cap = [pause for pause in drawn if pause < 30.0]
    assert len(set(below_cap)) == len(below_cap) > 2  # ...each drawn afresh
    pauses.reset()
    assert pauses.next() == 0.4


@pytest.mark.parametrize(("error", "transient"), [
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.InterfaceError("the connection is closed"), True),
    (psycopg.errors.ConnectionFailure("08006"), True),
    (psycopg.errors.SerializationFailure("40001"), True),
    (psycopg.errors.DeadlockDetected("40P01"), True),
    (psycopg.errors.DiskFull("53100"), True),
    (psycopg.errors.AdminShutdown("57P01"), True),
    (psycopg.errors.IdleInTransactionSessionTimeout("25P03: a paused process"), True),
    (psycopg.errors.InFailedSqlTransaction("25P02: another code of that class"), False),
    (psycopg.errors.UndefinedTable("42P01: a programming error"), False),
    (psycopg.errors.InsufficientPrivilege("42501"), False),
    (psycopg.errors.SyntaxError("42601"), False),
    (psycopg.errors.UniqueViolation("23505"), False),
    (psycopg.errors.RaiseException("P0001: the log's guard refused"), False),
    (ValueError("not a database error"), False),
])
def test_one_classification_retries_outages_and_reports_everything_else(
        error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_database_error_is_logged_by_its_first_line() -> None:
    assert first_line(psycopg.OperationalError("connection refused\n\tIs the server "
                                               "running?")) == "connection refused"
    assert first_line(psycopg.InterfaceError()) == "InterfaceError"
