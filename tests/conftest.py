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
from collections.abc import Iterator
from pathlib import Path

import pykka
import pytest

from relay.database import EmbeddedPostgres, apply_migrations, scratch_database, with_dbname


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
