"""`python -m relay check`: is this relay ready to run? Without notifying any device.

Three checks, each one line (ok, or the problem and how to fix it):
- configuration: the file parses and holds together (relay/config.py);
- database: reachable, every migration applied, and the runtime role unable to rewrite
  the log (relay/privilege.py);
- APNs: one request for `PROBE_TOKEN`, a well-formed token of no device. Apple answers
  `400 BadDeviceToken` only after accepting the provider token (or client certificate),
  the topic and the environment, so that answer proves them; every configuration
  reason names the setting to fix. No event is written: the probe is not a send.

Exit status 0 only when every check holds, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from relay import privilege
from relay.apns.client import ApnsClient
from relay.apns.reasons import Verdict
from relay.apns.results import ApnsResult
from relay.config import ApnsConfig, Config, ConfigError, load_config
from relay.database import DatabaseError, EmbeddedPostgres, connect, migrations
from relay.exits import ExitStatus

# 32 zero bytes: well-formed, and no device's (Apple's tokens are random).
PROBE_TOKEN = "00" * 32
DATABASE_CONNECT_TIMEOUT = 5
PROBE_MARGIN = 1.0  # seconds beyond apns.request_timeout to wait for the client's answer

# What to fix for each answer that stops the relay as a configuration error.
FIXES: dict[str, str] = {
    "InvalidProviderToken": "apns.key_file, apns.key_id and apns.team_id must be a key the "
                            "endpoint knows: the key id of that .p8 file, in that team",
    "ExpiredProviderToken": "this machine's clock is more than an hour off: fix NTP",
    "Forbidden": "the credentials are refused: check apns.key_file/key_id/team_id "
                 "(or apns.cert_file)",
    "TopicDisallowed": "apns.topic is not an app this key or certificate may push to",
    "BadTopic": "apns.topic is not a valid bundle id",
    "BadCertificate": "apns.cert_file is not a push certificate for apns.topic",
    "BadCertificateEnvironment": "apns.cert_file is for the other environment: set "
                                 "apns.environment to match it",
    "BadEnvironmentKeyIdInToken": "the key is for the other environment: set "
                                  "apns.environment to match it",
    "BadEnvironmentKeyInToken": "the key is for the other environment: set "
                                "apns.environment to match it",
    "UnrelatedKeyIdInToken": "apns.key_id does not belong to apns.team_id",
}
# Answers that prove the credentials, topic and environment were accepted.
ACCEPTED = {(400, "BadDeviceToken"), (400, "DeviceTokenNotForTopic"), (410, "Unregistered")}


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.name:<14}{'ok' if self.ok else 'PROBLEM'}: {self.detail}"
        return text if self.fix is None else f"{text}\n{'':<14}fix: {self.fix}"


# --- the database ----------------------------------------------------------------------


@contextmanager
def _database_dsn(config: Config) -> Iterator[tuple[str, bool]]:
    """(runtime DSN, embedded?): the configured server, else the embedded one started for
    the check, as the runtime role the relay runs as there."""
    if config.database.dsn is not None:
        yield config.database.dsn, False
        return
    embedded = EmbeddedPostgres(config.database.data_dir)
    try:
        _, runtime = embedded.relay_roles(embedded.start())
        yield runtime, True
    finally:
        embedded.stop()


def check_database(config: Config) -> CheckResult:
    try:
        with _database_dsn(config) as (dsn, embedded), \
                connect(dsn, connect_timeout=DATABASE_CONNECT_TIMEOUT) as conn:
            return _check_connected(conn, embedded)
    except DatabaseError as exc:
        return CheckResult("database", False, str(exc), "see the message above")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckResult("database", False, f"cannot connect: {first}",
                           "check database.dsn and that PostgreSQL is running and reachable")


def _check_connected(conn: psycopg.Connection[Any], embedded: bool) -> CheckResult:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    applied = ({name for (name,) in conn.execute("SELECT name FROM schema_migrations")}
               if exists and exists[0] else set())
    shipped = [name for name, _ in migrations()]
    pending = [name for name in shipped if name not in applied]
    if pending:
        return CheckResult("database", False, f"reachable; migrations not applied: "
                           f"{', '.join(pending)}",
                           "run `python -m relay migrate` (the relay also applies them at "
                           "start) with a role that may create tables")
    unknown = sorted(applied - set(shipped))
    if unknown:
        return CheckResult("database", False, f"the database has migrations this version "
                           f"does not know: {', '.join(unknown)}",
                           "run the relay version that applied them, or a newer one")
    problems = privilege.rewrite_rights_of(conn)
    if problems:
        return CheckResult("database", False, "reachable and migrated, but " +
                           "; ".join(problems),
                           "run the relay as a role that may only SELECT and INSERT on "
                           "events (migrations with the owner's role)")
    where = "embedded PostgreSQL" if embedded else "reachable"
    return CheckResult("database", True, f"{where}, migrated; the runtime role can only "
                       "append to the log")


# --- APNs ------------------------------------------------------------------------------


def check_apns(config: Config) -> CheckResult:
    if config.apns.credentials_given:
        return probe(config.apns, config.wakeup.interval, where=config.apns.url)
    from relay import environment

    with environment.apns(config) as simulated:
        result = probe(simulated, config.wakeup.interval, where="the built-in simulator")
    if not result.ok:
        return result
    return CheckResult("apns", True, f"{result.detail}; with no APNs credentials configured "
                       "the relay uses this simulator and NO NOTIFICATION LEAVES THIS "
                       "MACHINE (set apns.key_file, apns.key_id, apns.team_id and apns.topic "
                       "to reach Apple)")


def probe(apns: ApnsConfig, interval: float, *, where: str) -> CheckResult:
    """One request for PROBE_TOKEN, and what its answer says about the configuration."""
    try:
        client = ApnsClient(apns, expiration=interval)
    except (OSError, ValueError) as exc:  # an unreadable key, a certificate TLS refuses
        return CheckResult("apns", False, f"cannot use the credentials: {exc}",
                           "check apns.key_file, or apns.cert_file and apns.cert_key_file")
    client.start()
    try:
        answer = client.send(PROBE_TOKEN, str(uuid.uuid4()))
        result = answer.result(apns.request_timeout + PROBE_MARGIN)
        return _verdict(result, where, client.last_connect_error)
    finally:
        client.close()


def _verdict(result: ApnsResult, where: str, connect_error: str | None) -> CheckResult:
    status, reason = result.status, result.reason
    said = f"{where} answered {status} {reason or ''}".rstrip()
    accepted = "credentials, topic and environment accepted"
    if (status, reason) in ACCEPTED:
        return CheckResult("apns", True, f"{said} for a token of no device: {accepted}")
    if status == 200:
        return CheckResult("apns", True, f"{said} for a token of no device (the endpoint "
                           f"does not know which tokens exist, as a simulator): {accepted}")
    if status is None:
        why = connect_error or reason or "no answer"
        return CheckResult("apns", False, f"no answer from {where}: {why}",
                           "check apns.endpoint (or apns.environment), the network path to it, "
                           "and apns.ca_file")
    if result.verdict is Verdict.CONFIGURATION:
        fix = FIXES.get(reason or "", "check apns.key_file/key_id/team_id (or "
                        "apns.cert_file), apns.topic and apns.environment")
        return CheckResult("apns", False, said, fix)
    if result.verdict is Verdict.TRANSIENT:
        return CheckResult("apns", False, f"{said}: the service is in trouble, nothing was "
                           "decided", "run the check again later")
    return CheckResult("apns", False, f"{said}: the endpoint refused the request itself",
                       "a relay bug, or apns.endpoint is not an APNs service: report it")


# --- the command -----------------------------------------------------------------------


def run_checks(config_path: str | None) -> list[CheckResult]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [CheckResult("configuration", False, str(exc),
                            f"correct {exc.key or 'the file'} as the message says"),
                CheckResult("database", False, "not checked: the configuration is invalid"),
                CheckResult("apns", False, "not checked: the configuration is invalid")]
    return [CheckResult("configuration", True, f"{config.source} is valid"),
            check_database(config), check_apns(config)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay check",
        description="Check the configuration, the database and the APNs credentials "
                    "without notifying any device; exit 0 only when all hold.")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def check_main(config_path: str | None, argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return ExitStatus.OK if exc.code == 0 else ExitStatus.USAGE
    results = run_checks(config_path)
    ok = all(result.ok for result in results)
    if args.json:
        json.dump({"ok": ok, "checks": [asdict(result) for result in results]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for result in results:
            print(result.line())
    return ExitStatus.OK if ok else ExitStatus.FAILURE
