"""Least privilege: the role the relay runs as cannot rewrite the event log.

The guard triggers (schema/001_event_log.sql) stop every role but one: the table's
owner (or a superuser) may disable them, rewrite rows and recompute the chain. So the
tables belong to an owner role that only migrations use (`database.owner_dsn`), and the
runtime role (`database.dsn`) gets exactly the rights below: read the log, append to
it, lock its head, keep the cache tables. `rewrite_rights` lists what a role could use
to rewrite history; the relay refuses to run with such a runtime role when an owner is
configured, and warns when none is.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from relay.database import connect

# What the runtime role needs, and nothing more (README.md shows the same statements).
# `FOR UPDATE` on the head needs an UPDATE right on one column: `id`, which the head's
# guard never lets change; the head's position and hash are moved by the insert trigger,
# which runs with its owner's rights (migration 004).
RUNTIME_GRANTS = (
    "GRANT SELECT, INSERT ON events TO {role}",
    "GRANT SELECT, UPDATE (id) ON log_head TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON devices, runs TO {role}",
    "GRANT SELECT, INSERT, DELETE ON journal_batches TO {role}",
    "GRANT SELECT ON schema_migrations TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON cluster_shards, cluster_members TO {role}",
)

_OWNED = ("events", "log_head")


class PrivilegeError(Exception):
    """The runtime role could rewrite the log although an owner role is configured."""


def current_role(dsn: str) -> str:
    with connect(dsn) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


def grant_runtime(owner_dsn: str, role: str) -> None:
    """Give `role` the runtime rights (idempotent; run by the tables' owner)."""
    with connect(owner_dsn, autocommit=True) as conn:
        for statement in RUNTIME_GRANTS:
            conn.execute(sql.SQL(statement).format(role=sql.Identifier(role)))


def rewrite_rights(dsn: str) -> list[str]:
    """What the role of `dsn` could use to rewrite the log; empty when nothing."""
    with connect(dsn) as conn:
        return rewrite_rights_of(conn)


def rewrite_rights_of(conn: psycopg.Connection[Any]) -> list[str]:
    row = conn.execute("SELECT current_user, rolsuper FROM pg_roles"
                       " WHERE rolname = current_user").fetchone()
    assert row is not None
    role, superuser = row
    if superuser:
        return [f"role {role} is a superuser"]
    problems = []
    for table in _OWNED:
        owned = conn.execute(
            "SELECT pg_has_role(current_user, c.relowner, 'MEMBER') FROM pg_class c"
            " WHERE c.oid = to_regclass(%s)", (table,)).fetchone()
        if owned and owned[0]:  # also a member of the owner's role: SET ROLE makes it the owner
            problems.append(f"role {role} owns {table} (ALTER, DROP, disable its triggers)")
            continue
        rights = [right for right in ("UPDATE", "DELETE", "TRUNCATE", "TRIGGER")
                  if _table_right(conn, table, right)]
        if table == "log_head" and "UPDATE" in rights and not any(
                _column_right(conn, table, column) for column in ("position", "hash")):
            rights.remove("UPDATE")  # UPDATE (id) only: what FOR UPDATE needs
        if rights:
            problems.append(f"role {role} may {', '.join(rights)} {table}")
    return problems


def _table_right(conn: psycopg.Connection[Any], table: str, right: str) -> bool:
    """UPDATE counts when granted on any column; the other rights are table-wide."""
    check = "has_any_column_privilege" if right == "UPDATE" else "has_table_privilege"
    row = conn.execute(sql.SQL("SELECT {}(current_user, %s, %s)").format(sql.Identifier(check)),
                       (table, right)).fetchone()
    return bool(row and row[0])


def _column_right(conn: psycopg.Connection[Any], table: str, column: str) -> bool:
    row = conn.execute("SELECT has_column_privilege(current_user, %s, %s, 'UPDATE')",
                       (table, column)).fetchone()
    return bool(row and row[0])
