"""The configuration: strict parsing, precise errors, documented defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from relay.config import (
    Config,
    ConfigError,
    config_from_mapping,
    load_config,
    parse_duration,
)

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), (1.5, 1.5), ("250ms", 0.25), ("15m", 900.0), ("1h", 3600.0), ("2s", 2.0),
    ("1d", 86400.0), ("0", 0.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "15 minutes", "-5", "1h30m", True, None, [1]])
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.wakeup.attempts == 5
    assert (config.wakeup.backoff_base, config.wakeup.backoff_max) == (900.0, 3600.0)
    assert config.wakeup.backoff_factor == 2.5
    assert config.wakeup.max_in_flight == 1000
    assert config.registry.clock_skew == 5.0
    assert config.apns.url == "https://api.push.apple.com"


def test_every_key_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for section in fields(Config):
        if section.name == "source":
            continue
        for key in fields(getattr(Config(), section.name)):
            assert f"`{section.name}.{key.name}`" in readme, f"{section.name}.{key.name}"


@pytest.mark.parametrize(("raw", "key", "problem"), [
    ({"wakeup": {"intervall": "1h"}}, "wakeup.intervall", "unknown key"),
    ({"wakup": {}}, "wakup", "unknown section"),
    ({"wakeup": {"interval": "soon"}}, "wakeup.interval", "duration"),
    ({"wakeup": {"attempts": 0}}, "wakeup.attempts", "at least 1"),
    ({"wakeup": {"attempts": "5"}}, "wakeup.attempts", "whole number"),
    ({"http": {"listen": "8080"}}, "http.listen", "host:port"),
    ({"apns": {"environment": "staging"}}, "apns.environment", "production, sandbox"),
    ({"apns": {"endpoint": "http://x"}}, "apns.endpoint", "https://"),
    ({"apns": {"key_id": "short"}}, "apns.key_id", "10-character"),
    ({"apns": {"key_file": "/nonexistent.p8"}}, "apns.key_file", "no readable file"),
    ({"wakeup": {"backoff_base": "2h"}}, "wakeup.backoff_max", "at least wakeup.backoff_base"),
    ({"database": "x"}, "database", "mapping"),
])
def test_errors_name_the_key_and_the_problem(raw: object, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(raw, "relay.yaml")
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"relay.yaml: {key}: ")


def test_token_auth_keys_go_together(tmp_path: Path) -> None:
    key = tmp_path / "AuthKey.p8"
    key.write_text("x")
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"apns": {"key_file": str(key), "topic": "t"}}, "c.yaml")
    assert caught.value.key == "apns.key_id"
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"apns": {"key_file": str(key), "key_id": "ABCDE12345",
                                      "team_id": "ABCDE12345"}}, "c.yaml")
    assert caught.value.key == "apns.topic"


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("wakeup:\n  interval: [1h\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_environment_variable_names_the_file(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("wakeup:\n  interval: 90s\n  backoff_base: 1s\n")
    monkeypatch.setenv("RELAY_CONFIG", str(path))
    config = load_config()
    assert config.wakeup.interval == 90.0
    assert config.source == str(path)


def test_cli_reports_one_line_and_exit_status_2(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("http:\n  listen: 127.0.0.1:8080\n  max_bodyy: 10\n")
    result = subprocess.run([sys.executable, "-m", "relay", "-c", str(path), "wakeup"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(rf"{re.escape(str(path))}: http\.max_bodyy: unknown key", lines[0])
    assert "Traceback" not in result.stderr
