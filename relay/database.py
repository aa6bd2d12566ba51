"""PostgreSQL for the relay: connections, migrations, and the embedded server.

With no `database.dsn` the relay runs a private PostgreSQL in `database.data_dir`,
from the `pgserver` wheel when it is installed (the `embedded` extra), else from
the machine's PostgreSQL server binaries. Several relay processes on one data
dir share one server: each holds a shared lock on the directory while it runs,
and the last one out stops the server.

The private server is private: it listens on no TCP port, only on a Unix socket in
its data directory (mode 0700, socket 0700), so no other OS user can connect. Started
as root, it runs as a dedicated account (`apns-relay`, created when missing; never a
shared one such as `nobody`) with no supplementary groups, and the lock files the
relay opens as root refuse symlinks, so that account cannot redirect them. In it the
log belongs to an owner role that only migrations use; the relay runs as a runtime
role that cannot rewrite the log (relay/privilege.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import logging
import os
import pwd
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import IO, Any

import psycopg

from relay.backoff import DecorrelatedJitter

log = logging.getLogger(__name__)

# The database retry policy of every reader and writer (as the original relay):
# decorrelated jitter between RETRY_MIN and RETRY_MAX seconds.
RETRY_MIN = 0.4
RETRY_MAX = 30.0


class RetryPauses:
    """Successive pauses while the database is away: RETRY_MIN first, then each drawn
    between RETRY_MIN and three times the last, capped at RETRY_MAX, so that the clients
    an outage stopped together do not all come back in step."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._jitter = DecorrelatedJitter(RETRY_MIN, RETRY_MAX, 3.0, rng)
        self._next = RETRY_MIN

    def next(self) -> float:
        pause = self._next
        self._next = self._jitter.next_delay(pause)
        return pause

    def reset(self) -> None:
        """After a success: the next outage starts again from RETRY_MIN."""
        self._next = self._jitter.base


# Errors worth waiting out: the connection or the server failed, not the statement.
# SQLSTATE classes: 08 connection, 40 rollback (serialization, deadlock),
# 53 insufficient resources, 57 operator intervention (shutdown, terminated), 58 I/O.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# And one code of another class: the server ended our transaction for sitting idle
# (`idle_transaction_limit`): the connection is gone, the statement may be sent again.
TRANSIENT_SQLSTATES = frozenset({"25P03"})


def is_transient(exc: BaseException) -> bool:
    """Should this database error be retried (with `RetryPauses`)?

    The one classification every reader and writer of the relay uses. Yes for a lost or
    refused connection and the SQLSTATE classes above: the same statement may succeed
    once the server is back. No for everything else (a programming error such as an
    undefined table or a missing privilege, a violated constraint): it would fail the
    same way forever, so it is reported instead of retried.
    """
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate or ""
    return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES


def first_line(exc: BaseException) -> str:
    """A database error for a log line: the first line of its message, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Migrations run under this advisory lock, so relay processes starting together
# apply each file exactly once instead of racing on CREATE TABLE.
MIGRATION_LOCK_KEY = 0x61706E73  # "apns"
EMBEDDED_DATABASE = "relay"
# PostgreSQL refuses to run as root; started as root, the server runs as this account.
SERVER_ACCOUNT = "apns-relay"
# The embedded database's roles: the owner of the log (migrations), and the relay's.
OWNER_ROLE = "apns_relay_owner"
RUNTIME_ROLE = "apns_relay"
START_TIMEOUT = 60.0


class DatabaseError(Exception):
    """The database cannot be used; the message says what to do."""


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection whose connect timeout is bounded: an unreachable server must not hang us."""
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(dsn, **kwargs)


def idle_transaction_limit(seconds: float) -> str:
    """`options` for a connection whose transactions take locks other relay processes
    wait on (the log's head, shard rows): the server ends a transaction of it that sits
    idle `seconds` between statements. The relay's own transactions never wait on
    anything between their statements, so only a paused or frozen process (SIGSTOP, a
    VM stall, a client gone quiet) gets there, and it must not stall every other
    process on the database for longer than that. (A statement waiting for its client,
    such as a COPY fed row by row, is not timed at all: the relay sends a COPY's rows
    in one write, events/batch_sql.py.)"""
    return f"-c idle_in_transaction_session_timeout={max(100, round(seconds * 1000))}"


def with_dbname(dsn: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


@contextmanager
def scratch_database(admin_dsn: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A database of its own (a copy of `template`, if given), dropped afterwards.

    For tests and benchmarks: `admin_dsn` must be allowed to create databases.
    Yields the database's name (see `with_dbname`).
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrations() -> list[tuple[str, str]]:
    """The numbered SQL files shipped in the `schema` package, in order."""
    files = [f for f in resources.files("schema").iterdir() if f.name.endswith(".sql")]
    return sorted((f.name, f.read_text(encoding="utf-8")) for f in files)


def apply_migrations(dsn: str) -> list[str]:
    """Apply every migration not applied yet, each in its own transaction; returns their names.

    Idempotent and safe when several processes start at once: the advisory lock
    serialises them and the `schema_migrations` table records what is done.
    """
    applied: list[str] = []
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, sql in migrations():
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
                log.info("applied migration %s", name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied


# --- the embedded server -----------------------------------------------------------


def _reachable(path: Path, account: pwd.struct_passwd | None) -> bool:
    """Whether `account` (None: ourselves) can pass through every directory above `path`."""
    if account is None:
        return True
    for parent in path.parents:
        info = parent.stat()
        if info.st_uid != account.pw_uid and not info.st_mode & 0o001:
            return False
    return True


def _server_binaries(account: pwd.struct_passwd | None) -> Path | None:
    """The directory holding `initdb`, `pg_ctl` and `postgres` that `account` can run.

    The `pgserver` wheel's copy comes first; the machine's binaries are the fallback
    (also when the wheel sits where the unprivileged account cannot reach it).
    """
    candidates = [os.environ.get("RELAY_PG_BINDIR", "")]
    wheel = importlib.util.find_spec("pgserver")  # optional: the `embedded` extra
    if wheel is not None and wheel.submodule_search_locations:
        candidates.append(str(Path(wheel.submodule_search_locations[0]) / "pginstall" / "bin"))
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in filter(None, candidates):
        path = Path(candidate)
        tools = [path / tool for tool in ("initdb", "pg_ctl", "postgres")]
        if all(tool.is_file() for tool in tools) and _reachable(tools[0], account):
            return path
    return None


def _unprivileged_account() -> pwd.struct_passwd | None:
    """None when we are not root; else the dedicated account the server runs as
    (created as a system account without a login shell when missing)."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_ACCOUNT)
    useradd = shutil.which("useradd")
    if useradd is not None:
        subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", SERVER_ACCOUNT],
                       capture_output=True, check=False)
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise DatabaseError(
            "running as root, and PostgreSQL refuses to run as root: create the system "
            f"account {SERVER_ACCOUNT!r} (useradd --system {SERVER_ACCOUNT}) or set "
            "database.dsn") from None


def _open_lock(path: Path) -> IO[str]:
    """A lock file opened without following a symlink (the data directory belongs to
    the server's account, which must not point root at another file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "a")


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[IO[str]]:
    handle = _open_lock(path)
    try:
        fcntl.flock(handle, mode)
        yield handle
    finally:
        handle.close()


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a directory, shared by the processes using it.

    `start()` returns a DSN; `stop()` releases this process's claim and stops the
    server when no other process holds one.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._users_handle: IO[str] | None = None

    @property
    def _setup_lock(self) -> Path:
        return self.data_dir / "setup.lock"

    @property
    def _users_lock(self) -> Path:
        return self.data_dir / "users.lock"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self._ensure_database(self._start_server())

    def _start_server(self) -> str:
        account = _unprivileged_account()
        bindir = _server_binaries(account)
        if bindir is None:
            raise DatabaseError(
                "no PostgreSQL available for the embedded database: install the `embedded` "
                "extra (pip install 'apns-relay[embedded]', which brings pgserver) or the "
                "PostgreSQL server binaries (initdb, pg_ctl, postgres), or set database.dsn"
            )
        with _locked(self._setup_lock, fcntl.LOCK_EX):
            if account is not None:
                if not _reachable(self.data_dir, account):
                    raise DatabaseError(
                        f"database.data_dir {self.data_dir} lies in a directory that the "
                        f"unprivileged account {account.pw_name!r} running PostgreSQL cannot "
                        "enter; choose a data_dir outside it (e.g. under /var/lib)"
                    )
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            if not (self.pgdata / "PG_VERSION").exists():
                self._run(account, [str(bindir / "initdb"), "-D", str(self.pgdata), "-U",
                                    "postgres", "--auth=trust", "--encoding=UTF8",
                                    "--no-instructions"])
            if not self._running(bindir, account):
                log.info("starting the embedded PostgreSQL in %s", self.pgdata)
                self._run(account, [
                    str(bindir / "pg_ctl"), "-D", str(self.pgdata), "-w",
                    "-t", str(int(START_TIMEOUT)), "-l", str(self.data_dir / "postgres.log"),
                    "-o", f"-c listen_addresses='' -k {self.pgdata} -c fsync=on"
                          " -c unix_socket_permissions=0700", "start",
                ])
            self._users_handle = _open_lock(self._users_lock)
            fcntl.flock(self._users_handle, fcntl.LOCK_SH)
        return f"postgresql://postgres@/postgres?host={self.pgdata}"

    def _running(self, bindir: Path, account: pwd.struct_passwd | None) -> bool:
        result = self._run(account, [str(bindir / "pg_ctl"), "-D", str(self.pgdata), "status"],
                           check=False)
        return result.returncode == 0

    def _run(self, account: pwd.struct_passwd | None, argv: list[str],
             check: bool = True) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            if account is not None:
                os.setgroups([])  # root's supplementary groups must not follow
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)

        result = subprocess.run(argv, capture_output=True, text=True, preexec_fn=demote,
                                cwd="/", check=False)
        if check and result.returncode != 0:
            raise DatabaseError(
                f"{Path(argv[0]).name} failed for {self.pgdata}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result

    @staticmethod
    def _ensure_database(server_dsn: str) -> str:
        """The relay keeps its log in its own database on the private server."""
        with connect(server_dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (EMBEDDED_DATABASE,)).fetchone()
            if not exists:
                # Another relay process may have created it a moment ago.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
        return with_dbname(server_dsn, EMBEDDED_DATABASE)

    @staticmethod
    def relay_roles(superuser_dsn: str) -> tuple[str, str]:
        """(owner DSN, runtime DSN) of the relay's database on the private server: the
        owner role owns the database and everything in it (also a log created before
        the roles existed), the runtime role owns nothing."""
        with connect(superuser_dsn, autocommit=True) as conn:
            for role in (OWNER_ROLE, RUNTIME_ROLE):
                if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                    (role,)).fetchone():
                    with contextlib.suppress(psycopg.errors.DuplicateObject):
                        conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(f'ALTER DATABASE "{EMBEDDED_DATABASE}" OWNER TO "{OWNER_ROLE}"')
            owned = conn.execute(
                "SELECT 'TABLE', c.relname FROM pg_class c JOIN pg_namespace n"
                "   ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind = 'r'"
                "   AND pg_get_userbyid(c.relowner) <> %s"
                " UNION ALL SELECT 'FUNCTION', p.proname || '()' FROM pg_proc p"
                "   JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> %s",
                (OWNER_ROLE, OWNER_ROLE)).fetchall()
            for kind, name in owned:
                conn.execute(f'ALTER {kind} {name} OWNER TO "{OWNER_ROLE}"')
        params = psycopg.conninfo.conninfo_to_dict(superuser_dsn)
        return tuple(  # type: ignore[return-value]
            psycopg.conninfo.make_conninfo(**{**{k: str(v) for k, v in params.items()},
                                              "user": role})
            for role in (OWNER_ROLE, RUNTIME_ROLE))

    def stop(self) -> None:
        """Release our claim; the last process out stops the server."""
        if self._users_handle is None:
            return
        with _locked(self._setup_lock, fcntl.LOCK_EX):
            self._users_handle.close()
            self._users_handle = None
            with _open_lock(self._users_lock) as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another relay process still uses the server
                account = _unprivileged_account()
                bindir = _server_binaries(account)
                if bindir is not None:
                    self._run(account, [
                        str(bindir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w",
                        "stop"], check=False)


def wait_until_reachable(dsn: str, timeout: float) -> None:
    """Block until a connection succeeds, or raise DatabaseError naming the last failure."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(dsn, connect_timeout=max(1, int(timeout))):
                return
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise DatabaseError(f"cannot reach the database: {first_line(exc)}") from None
            time.sleep(0.5)
