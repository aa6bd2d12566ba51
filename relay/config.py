"""The relay's configuration: one YAML file, every key documented in README.md.

Parsing is strict because a push relay that silently ignores a misspelt key
(say `wakeup.intervall`) would run for weeks on a default nobody chose. Every
problem becomes one `ConfigError` naming the file, the key path and what is
wrong; `python -m relay` prints it on one line and exits with status 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml
from psycopg import ProgrammingError, conninfo

CONFIG_ENV = "RELAY_CONFIG"

APNS_HOSTS = {
    "production": "https://api.push.apple.com",
    "sandbox": "https://api.sandbox.push.apple.com",
}


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as `250ms`, `15m`, `1h`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '250ms', '15m' or '1h', got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"a duration must be a finite number, got {value!r}")
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30, '250ms', '15m' or '1h', got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_listen(value: object) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) as a (host, port) pair."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected 'host:port', got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected 'host:port' with a port from 0 to 65535, got {value!r}")
    return host, int(port_text)


def _default_data_dir() -> Path:
    """Root's home is closed to the account PostgreSQL runs as, so root uses /var/lib."""
    if os.geteuid() == 0:
        return Path("/var/lib/apns-relay")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "apns-relay"


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str | None = None
    data_dir: Path = field(default_factory=_default_data_dir)
    owner_dsn: str | None = None  # migrations run with it; `dsn` then owns nothing


@dataclass(frozen=True)
class HttpConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    metrics_listen: tuple[str, int] | None = None
    max_body: int = 4096
    rate_limit: float = 20.0
    rate_burst: int = 40
    client_ip_header: str | None = None
    max_connections: int = 1024
    request_timeout: float = 10.0


@dataclass(frozen=True)
class ApnsConfig:
    environment: str = "production"
    endpoint: str | None = None
    ca_file: Path | None = None
    topic: str | None = None
    key_file: Path | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert_file: Path | None = None
    cert_key_file: Path | None = None
    connections: int = 1
    processes: int = 0
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    idle_ping: float = 3600.0

    @property
    def url(self) -> str:
        """The base URL requests go to: the override, else Apple's host for the environment."""
        return self.endpoint or APNS_HOSTS[self.environment]

    @property
    def token_auth(self) -> bool:
        return self.key_file is not None

    @property
    def credentials_given(self) -> bool:
        """False means: no credentials at all, so the relay runs its own simulator."""
        return self.key_file is not None or self.cert_file is not None


@dataclass(frozen=True)
class WakeupConfig:
    interval: float = 3600.0
    attempts: int = 5
    backoff_base: float = 900.0
    backoff_max: float = 3600.0
    backoff_factor: float = 2.5
    max_in_flight: int = 1000
    breaker_pause: float = 900.0
    drain_timeout: float = 30.0
    senders: int = 4
    progress_interval: float = 10.0


@dataclass(frozen=True)
class ClusterConfig:
    """Several relay processes on one database: the run's tokens in `shards` hash ranges,
    leased by the live processes for `lease_ttl` seconds at a time (relay/cluster.py)."""

    shards: int = 64
    lease_ttl: float = 10.0

    @property
    def hold_limit(self) -> float:
        """How long a transaction of this process may sit idle holding locks the others
        wait on before the server ends it: a paused process must not stall the cluster
        beyond the time its own leases take to lapse."""
        return self.lease_ttl / 2


@dataclass(frozen=True)
class RegistryConfig:
    clock_skew: float = 5.0


@dataclass(frozen=True)
class AuditConfig:
    signing_key: Path | None = None  # default: signing_key.pem in database.data_dir
    checkpoint_dir: Path | None = None  # default: checkpoints/ in database.data_dir


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    apns: ApnsConfig = field(default_factory=ApnsConfig)
    wakeup: WakeupConfig = field(default_factory=WakeupConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<embedded defaults>"

    @property
    def signing_key(self) -> Path:
        return self.audit.signing_key or self.database.data_dir / "signing_key.pem"

    @property
    def checkpoint_dir(self) -> Path:
        return self.audit.checkpoint_dir or self.database.data_dir / "checkpoints"


# --- value parsers -----------------------------------------------------------------

T = TypeVar("T")
Parser = Callable[[object], Any]


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _path(value: object) -> Path:
    return Path(os.path.expanduser(_text(value)))


def _existing_file(value: object) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"no readable file at {str(path)!r}")
    return path


def _dsn(value: object) -> str:
    """A libpq connection string or URI that libpq can parse, with a numeric port."""
    text = _text(value)
    try:
        options = conninfo.conninfo_to_dict(text)
    except ProgrammingError as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be parsed"
        raise ValueError(f"not a PostgreSQL connection string: {problem}") from None
    for port in str(options.get("port") or "5432").split(","):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a PostgreSQL connection string: port {port!r} is not a "
                             "number from 1 to 65535")
    return text


def _optional(parser: Parser) -> Parser:
    return lambda value: None if value is None else parser(value)


def _int_at_least(minimum: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _int_between(minimum: int, maximum: int) -> Parser:
    at_least = _int_at_least(minimum)

    def parse(value: object) -> int:
        number: int = at_least(value)
        if number > maximum:
            raise ValueError(f"must be at most {maximum}, got {number}")
        return number

    return parse


def _number_at_least(minimum: float) -> Parser:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return float(value)

    return parse


def _duration_at_least(minimum: float) -> Parser:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ValueError(f"must be at least {minimum:g}s, got {value!r}")
        return seconds

    return parse


def _choice(*options: str) -> Parser:
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def _apns_endpoint(value: object) -> str:
    text = _text(value).rstrip("/")
    if not re.match(r"^https://[^/\s]+$", text):
        raise ValueError(f"expected 'https://host[:port]' with no path, got {value!r}")
    return text


def _key_id(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Z0-9]{10}", text):
        raise ValueError(f"expected Apple's 10-character id (A-Z, 0-9), got {value!r}")
    return text


_PARSERS: dict[str, dict[str, Parser]] = {
    "database": {"dsn": _optional(_dsn), "data_dir": _path, "owner_dsn": _optional(_dsn)},
    "http": {
        "listen": parse_listen,
        "metrics_listen": _optional(parse_listen),
        "max_body": _int_at_least(64),
        "rate_limit": _number_at_least(0),
        "rate_burst": _int_at_least(1),
        "client_ip_header": _optional(_text),
        "max_connections": _int_at_least(1),
        "request_timeout": _duration_at_least(0.1),
    },
    "apns": {
        "environment": _choice("production", "sandbox"),
        "endpoint": _optional(_apns_endpoint),
        "ca_file": _optional(_existing_file),
        "topic": _optional(_text),
        "key_file": _optional(_existing_file),
        "key_id": _optional(_key_id),
        "team_id": _optional(_key_id),
        "cert_file": _optional(_existing_file),
        "cert_key_file": _optional(_existing_file),
        "connections": _int_at_least(1),
        "processes": _int_at_least(0),
        "connect_timeout": _duration_at_least(0.001),
        "request_timeout": _duration_at_least(0.001),
        "idle_ping": _duration_at_least(1),
    },
    "wakeup": {
        "interval": _duration_at_least(0.001),
        "attempts": _int_at_least(1),
        "backoff_base": _duration_at_least(0),
        "backoff_max": _duration_at_least(0),
        "backoff_factor": _number_at_least(1),
        "max_in_flight": _int_at_least(1),
        "breaker_pause": _duration_at_least(0),
        "drain_timeout": _duration_at_least(0),
        "senders": _int_at_least(1),
        "progress_interval": _duration_at_least(0.1),
    },
    "registry": {"clock_skew": _duration_at_least(0)},
    # Shards are ranges of a 16-bit token hash (relay/cluster.py): at most 65,536 of them.
    "cluster": {"shards": _int_between(1, 65536), "lease_ttl": _duration_at_least(1)},
    "audit": {"signing_key": _optional(_path), "checkpoint_dir": _optional(_path)},
    "logging": {"level": _choice("DEBUG", "INFO", "WARNING", "ERROR"),
                "format": _choice("text", "json")},
}

_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseConfig,
    "http": HttpConfig,
    "apns": ApnsConfig,
    "wakeup": WakeupConfig,
    "registry": RegistryConfig,
    "cluster": ClusterConfig,
    "audit": AuditConfig,
    "logging": LoggingConfig,
}

assert all(
    set(_PARSERS[name]) == {f.name for f in fields(cls)} for name, cls in _SECTIONS.items()
), "every config field needs a parser and every parser a field"


def config_from_mapping(raw: object, source: str) -> Config:
    """Validate a parsed YAML document; every problem names its key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(source, "", "the top level must be a mapping of sections")
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            known = ", ".join(_SECTIONS)
            raise ConfigError(source, str(name), f"unknown section (known: {known})")
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(source, name, "expected a mapping of keys")
        parsers = _PARSERS[name]
        parsed: dict[str, Any] = {}
        for key, item in value.items():
            if key not in parsers:
                known = ", ".join(parsers)
                raise ConfigError(source, f"{name}.{key}", f"unknown key (known: {known})")
            try:
                parsed[key] = parsers[key](item)
            except ValueError as exc:
                raise ConfigError(source, f"{name}.{key}", str(exc)) from None
        sections[name] = _SECTIONS[name](**parsed)
    config = Config(**sections, source=source)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    apns, wakeup, source = config.apns, config.wakeup, config.source
    token_keys = {"apns.key_file": apns.key_file, "apns.key_id": apns.key_id,
                  "apns.team_id": apns.team_id}
    given = [k for k, v in token_keys.items() if v is not None]
    if given and len(given) != len(token_keys):
        missing = next(k for k, v in token_keys.items() if v is None)
        raise ConfigError(source, missing, f"required with {', '.join(given)} for token auth")
    if (apns.cert_file is None) != (apns.cert_key_file is None):
        missing = "apns.cert_key_file" if apns.cert_key_file is None else "apns.cert_file"
        raise ConfigError(source, missing, "apns.cert_file and apns.cert_key_file go together")
    if apns.key_file is not None and apns.cert_file is not None:
        raise ConfigError(source, "apns.cert_file", "choose token auth (apns.key_file) "
                          "or certificate auth (apns.cert_file), not both")
    if apns.credentials_given and apns.topic is None:
        raise ConfigError(source, "apns.topic", "required when APNs credentials are given")
    if wakeup.backoff_max < wakeup.backoff_base:
        raise ConfigError(source, "wakeup.backoff_max",
                          f"must be at least wakeup.backoff_base ({wakeup.backoff_base:g}s)")


# Open files the relay needs besides its API's client connections: database connections,
# APNs connections, pipes to sender processes, log files, the embedded simulator's sockets.
OPEN_FILES_RESERVE = 128


def check_open_files(config: Config, limits: tuple[int, int] | None = None) -> int:
    """Make room for `http.max_connections` under the open-file limit (RLIMIT_NOFILE).

    Each client connection is an open file, so a limit below what the configuration
    allows would turn busy moments into `EMFILE` errors on unrelated work (a database
    reconnect, say). The soft limit is raised up to the hard one when that suffices;
    otherwise start-up is refused. Returns the soft limit in force.
    """
    import resource

    listeners = 1 if config.http.metrics_listen is None else 2
    needed = config.http.max_connections * listeners + OPEN_FILES_RESERVE
    soft, hard = limits or resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(config.source, "http.max_connections",
                          f"{config.http.max_connections} connections per listener need about "
                          f"{needed} open files, but the open-file limit is {hard} "
                          "(ulimit -n): lower http.max_connections or raise the limit")
    if soft != resource.RLIM_INFINITY and soft < needed:
        if limits is None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return soft


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The configuration from `path`, else `$RELAY_CONFIG`, else the embedded defaults."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the file ({exc.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise ConfigError(source, "", str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, "", f"not valid YAML{where}: {problem}") from None
    return config_from_mapping(raw, source)


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last
    one silently, so the first (which the operator may be reading) would not apply."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                what = "section" if node is getattr(self, "_root", None) else "key"
                raise _DuplicateKey(f"duplicate {what} {key!r} at line {line} "
                                    f"(first given at line {seen[key]})")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)
