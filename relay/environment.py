"""Where the relay's database and APNs come from: the configuration, or the embedded defaults.

With no `database.dsn` the relay runs its own PostgreSQL; with no APNs
credentials it runs the project's APNs simulator on loopback and says, loudly,
that no notification leaves the machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from relay import privilege
from relay.config import ApnsConfig, Config
from relay.database import EmbeddedPostgres, apply_migrations, wait_until_reachable

log = logging.getLogger(__name__)

SIMULATED_TOPIC = "org.example.relay.simulated"
DATABASE_WAIT = 30.0


@dataclass(frozen=True)
class Database:
    """The runtime DSN, the owner DSN (None: not configured) and what the runtime role
    could use to rewrite the log (empty, or a warning's worth: no owner is configured)."""

    dsn: str
    owner_dsn: str | None
    rewrite_rights: list[str]

    @property
    def warnings(self) -> list[str]:
        if not self.rewrite_rights:
            return []
        return ["the runtime role can rewrite the log (" + "; ".join(self.rewrite_rights)
                + "): set database.owner_dsn and give database.dsn a role that owns "
                "nothing (README: What the log proves, and to whom)"]


@contextmanager
def database(config: Config) -> Iterator[str]:
    """A DSN with every migration applied: the configured server, else the embedded one."""
    with database_access(config) as access:
        yield access.dsn


@contextmanager
def database_access(config: Config) -> Iterator[Database]:
    """The database with every migration applied (by the owner role when there is one)
    and the runtime role's rights checked: raises `privilege.PrivilegeError` when an
    owner is configured and the runtime role could still rewrite the log."""
    embedded: EmbeddedPostgres | None = None
    dsn, owner = config.database.dsn, config.database.owner_dsn
    if dsn is None:
        embedded = EmbeddedPostgres(config.database.data_dir)
        superuser = embedded.start()
        log.info("using the embedded PostgreSQL in %s", embedded.pgdata)
        owner, dsn = embedded.relay_roles(superuser)
    try:
        wait_until_reachable(dsn, DATABASE_WAIT)
        apply_migrations(owner or dsn)
        if owner is not None:
            privilege.grant_runtime(owner, privilege.current_role(dsn))
        rights = privilege.rewrite_rights(dsn)
        if rights and owner is not None:
            raise privilege.PrivilegeError(
                "the runtime role (database.dsn) can rewrite the event log: "
                + "; ".join(rights) + ". Give database.dsn a role that owns nothing "
                "(README: the GRANTs for a runtime role)")
        access = Database(dsn, owner, rights)
        for warning in access.warnings:
            log.warning("%s", warning)
        yield access
    finally:
        if embedded is not None:
            embedded.stop()


def apns_target(config: Config, in_use: ApnsConfig) -> dict[str, str | None]:
    """Where a run sends, as `run_started` records it: environment "simulator" when the
    relay runs its own simulator (no credentials), so the log says nothing reached Apple."""
    simulated = not config.apns.credentials_given
    return {"environment": "simulator" if simulated else in_use.environment,
            "endpoint": in_use.url}


@contextmanager
def apns(config: Config) -> Iterator[ApnsConfig]:
    """The APNs settings to use: the configured ones, else a simulator of our own."""
    if config.apns.credentials_given:
        yield config.apns
        return
    from relay.simulator import embedded_simulator

    simulator, simulated = embedded_simulator(config.apns.topic or SIMULATED_TOPIC)
    banner = "=" * 72
    log.warning(
        "\n%s\nNO APNs CREDENTIALS CONFIGURED: notifications go to the built-in APNs\n"
        "simulator at %s. NO NOTIFICATION LEAVES THIS MACHINE.\n"
        "Set apns.key_file, apns.key_id, apns.team_id and apns.topic to reach Apple.\n%s",
        banner, simulated.url, banner,
    )
    try:
        yield replace(simulated, connections=config.apns.connections,
                      processes=config.apns.processes,
                      connect_timeout=config.apns.connect_timeout,
                      request_timeout=config.apns.request_timeout,
                      idle_ping=config.apns.idle_ping)
    finally:
        simulator.stop()
