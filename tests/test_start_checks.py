"""What the relay refuses at start, each as one line and exit status 2: bad numbers and
duplicate keys in its file, a malformed DSN, unusable credentials or TLS files (whatever
`apns.processes` is), and more client connections than the open-file limit allows."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import apns_fixtures
import pytest
import yaml
from apns_fixtures import SimulatorFactory

from relay.config import Config, ConfigError, HttpConfig, check_open_files, load_config

simulator_factory = apns_fixtures.simulator_factory


def _relay(config: Path, *command: str, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "-c", str(config), *command],
                          capture_output=True, text=True, timeout=60, **options)


def _refused(answer: subprocess.CompletedProcess[str], *words: str) -> None:
    assert answer.returncode == 2, answer.stdout + answer.stderr
    lines = answer.stderr.strip().splitlines()
    assert len(lines) == 1 and "configuration error" in lines[0], answer.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "+.inf"])
@pytest.mark.parametrize("key", ["wakeup.backoff_factor", "wakeup.interval", "http.rate_limit",
                                 "wakeup.max_in_flight"])
def test_nan_and_infinities_are_refused_for_every_number(tmp_path: Path, key: str,
                                                         value: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "relay.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.key == key


def test_nan_in_a_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("wakeup:\n  breaker_pause: .nan\n")
    _refused(_relay(path, "migrate"), "wakeup.breaker_pause", "finite")


def test_a_duplicate_key_or_section_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("wakeup:\n  interval: 10\n  attempts: 3\n  interval: 20\n")
    _refused(_relay(path, "migrate"), "duplicate key 'interval'", "line 4", "line 2")
    path.write_text("wakeup:\n  interval: 10\nhttp:\n  max_body: 100\nwakeup:\n  attempts: 3\n")
    _refused(_relay(path, "migrate"), "duplicate section 'wakeup'", "line 5", "line 1")


@pytest.mark.parametrize("dsn", ["host=db port", "postgresql://[::1", "dbname=x sslmode",
                                 "postgresql://relay@db:notaport/relay", "dbname=x nosuch=1"])
def test_a_malformed_dsn_is_a_configuration_error(tmp_path: Path, dsn: str) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"database": {"dsn": dsn}}))
    _refused(_relay(path, "migrate"), "database.dsn", "not a PostgreSQL connection string")


def _credentials(tmp_path: Path, simulator_factory: SimulatorFactory,
                 **apns: Any) -> Path:
    _, config = simulator_factory()
    raw = {"database": {"dsn": "postgresql://nobody@127.0.0.1:1/none"},
           "apns": {"endpoint": config.endpoint, "ca_file": str(config.ca_file),
                    "topic": config.topic, "key_file": str(config.key_file),
                    "key_id": config.key_id, "team_id": config.team_id, **apns}}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("processes", [0, 2])
def test_a_wrong_key_file_exits_2_at_start_whatever_apns_processes_is(
        tmp_path: Path, simulator_factory: SimulatorFactory, processes: int) -> None:
    wrong = tmp_path / "AuthKey.p8"
    wrong.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    path = _credentials(tmp_path, simulator_factory, key_file=str(wrong), processes=processes)
    for command in ((), ("wakeup",)):
        _refused(_relay(path, *command), "apns.key_file", str(wrong))


def test_a_wrong_ca_file_or_topic_exits_2_at_start(
        tmp_path: Path, simulator_factory: SimulatorFactory) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello\n")
    _refused(_relay(_credentials(tmp_path, simulator_factory, ca_file=str(not_pem),
                                 processes=2)), "apns.ca_file", str(not_pem))
    _refused(_relay(_credentials(tmp_path, simulator_factory, topic="org.example app",
                                 processes=2)), "apns.topic", "bundle id")


def test_client_connections_must_fit_the_open_file_limit(tmp_path: Path) -> None:
    config = Config(http=HttpConfig(max_connections=5000))
    with pytest.raises(ConfigError) as refused:
        check_open_files(config, limits=(1024, 2048))
    assert refused.value.key == "http.max_connections" and "2048" in str(refused.value)
    assert check_open_files(config, limits=(1024, 65536)) >= 5000  # the soft limit is raised

    path = tmp_path / "relay.yaml"
    path.write_text("http:\n  max_connections: 5000\n")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    _refused(_relay(path, preexec_fn=low_limit), "http.max_connections", "ulimit -n")
