"""Real PostgreSQL for every test that needs one.

`RELAY_TEST_DSN` set: tests use that server (a superuser DSN). Otherwise a
private throwaway cluster is started in a temporary directory with the same
embedded-server code the relay itself uses. Either way each test gets its own
fresh database, cloned from a template that has every migration applied.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pykka
import pytest

from relay.database import EmbeddedPostgres, apply_migrations, with_dbname


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A superuser DSN on the test server (the one from RELAY_TEST_DSN, or a private one)."""
    external = os.environ.get("RELAY_TEST_DSN")
    if external:
        yield external
        return
    directory = Path(tempfile.mkdtemp(prefix="relay-test-pg-"))
    directory.chmod(0o755)
    server = EmbeddedPostgres(directory)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def scratch_database(admin_dsn: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A database of its own (a copy of `template`, if given), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    """A database with all migrations applied, cloned for each test."""
    with scratch_database(admin_dsn, "relay_tmpl") as name:
        apply_migrations(with_dbname(admin_dsn, name))
        yield name


@pytest.fixture
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh database of this test's own, every migration applied."""
    with scratch_database(admin_dsn, "relay_test", template_db) as name:
        yield with_dbname(admin_dsn, name)


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh database with no migration applied."""
    with scratch_database(admin_dsn, "relay_empty") as name:
        yield with_dbname(admin_dsn, name)


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """No actor outlives its test, whatever the test did."""
    yield
    pykka.ActorRegistry.stop_all()
