"""Signed checkpoints against the attacks a hash chain alone cannot see: a superuser's
rewrite with the chain recomputed, a rollback to an older state, and a forged checkpoint."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from events import checkpoint, codec
from events import types as ev
from events.audit import audit_main, rebuild_main
from events.batch_sql import append_bulk

T0 = 1_760_000_000_000
TOKENS = [f"{i:064x}" for i in range(1, 6)]


def seed(dsn: str) -> None:
    """A log with its genesis, five registrations and a delivered run."""
    assert checkpoint.create_log(dsn)
    append_bulk(dsn, [ev.device_registered(t, T0 + i) for i, t in enumerate(TOKENS)]
                + [ev.run_started(1, T0 + 100, len(TOKENS))]
                + [ev.notification_delivered(1, t, T0 + 101 + i, attempt=1, apns_id=f"id{i}",
                                             status=200, latency_ms=10.0)
                   for i, t in enumerate(TOKENS)])


@pytest.fixture
def key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    path = tmp_path / "keys" / "signing_key.pem"
    return checkpoint.load_or_create_key(path), path


def take(dsn: str, key: Ed25519PrivateKey, directory: Path) -> Path:
    with psycopg.connect(dsn) as conn:
        return checkpoint.write(directory, checkpoint.take(conn, key))


def verify(dsn: str, capsys: pytest.CaptureFixture[str], *args: str,
           key_file: Path | None = None) -> tuple[int, Any]:
    capsys.readouterr()
    status = audit_main(dsn, ["--verify", "--json", *args], signing_key=key_file)
    return status, json.loads(capsys.readouterr().out)


def superuser_rewrite(dsn: str, position: int, change: dict[str, Any]) -> None:
    """What the owner or a superuser can do: triggers off, one body changed, every later
    hash and the head recomputed, triggers on. Nothing left for the chain to see."""
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER ALL")
        conn.execute("ALTER TABLE log_head DISABLE TRIGGER ALL")
        rows = conn.execute("SELECT position, type, body FROM events ORDER BY position",
                            binary=True).fetchall()
        previous = codec.GENESIS_HASH
        for at, type_, body in rows:
            body = bytes(body)
            if at == position:
                doc = codec.decode(body)
                data = {k: v for k, v in doc.items() if k not in codec.RESERVED_KEYS}
                body = codec.canonical_bytes(at, type_, {**data, **change})
            previous = codec.chain_hash(previous, body)
            conn.execute("UPDATE events SET body = %s, hash = %s WHERE position = %s",
                         (body, previous, at))
        conn.execute("UPDATE log_head SET hash = %s", (previous,))
        enable_triggers(conn)


def enable_triggers(conn: psycopg.Connection[Any]) -> None:
    conn.execute("ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only")
    conn.execute("ALTER TABLE events ENABLE ALWAYS TRIGGER events_advance_head")
    conn.execute("ALTER TABLE log_head ENABLE ALWAYS TRIGGER log_head_guard")
    conn.execute("ALTER TABLE log_head ENABLE ALWAYS TRIGGER log_head_no_truncate")


def test_every_log_starts_with_its_own_random_genesis(dsn: str, empty_dsn: str) -> None:
    from relay.database import apply_migrations

    apply_migrations(empty_dsn)
    assert checkpoint.create_log(dsn) and checkpoint.create_log(empty_dsn)
    assert not checkpoint.create_log(dsn), "one genesis per log"
    ids = []
    for database in (dsn, empty_dsn):
        with psycopg.connect(database) as conn, conn.cursor() as cur:
            type_, body = cur.execute("SELECT type, body FROM events").fetchone() or ("", b"")
            assert type_ == ev.LOG_CREATED
            assert len(bytes.fromhex(json.loads(bytes(body))["genesis"])) == 32
            ids.append(checkpoint.log_id(cur))
    assert ids[0] != ids[1]


def test_the_signing_key_is_created_private_and_kept(key: tuple[Ed25519PrivateKey, Path]
                                                     ) -> None:
    private, path = key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = checkpoint.load_or_create_key(path)
    assert checkpoint.key_id(again.public_key()) == checkpoint.key_id(private.public_key())
    link = path.with_name("link.pem")
    link.symlink_to(path.with_name("elsewhere.pem"))
    with pytest.raises(OSError):  # a planted symlink is not written through
        checkpoint.load_or_create_key(link)
    assert not path.with_name("elsewhere.pem").exists()


def test_a_superuser_rewrite_passes_the_chain_but_not_an_older_checkpoint(
        dsn: str, tmp_path: Path, key: tuple[Ed25519PrivateKey, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    seed(dsn)
    private, key_file = key
    before = take(dsn, private, tmp_path / "checkpoints")
    delivered = 8  # the first notification_delivered (no cache column holds its latency)
    superuser_rewrite(dsn, delivered, {"latency_ms": 999.0})

    status, report = verify(dsn, capsys)
    assert status == 0 and report["verified"] is True, "the chain alone cannot tell"
    status, report = verify(dsn, capsys, "--checkpoint", str(tmp_path / "checkpoints"),
                            key_file=key_file)
    assert status == 1 and report["verified"] is False
    [problem] = report["problems"]
    assert problem["position"] == 12 and report["first_bad_position"] == 12
    assert str(before) in problem["problem"] and "rewritten" in problem["problem"]


def test_a_rollback_behind_a_checkpoint_is_caught(
        dsn: str, tmp_path: Path, key: tuple[Ed25519PrivateKey, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    seed(dsn)
    private, key_file = key
    early = take(dsn, private, tmp_path)
    append_bulk(dsn, [ev.device_registered("ee" * 32, T0 + 500)])
    late = take(dsn, private, tmp_path)
    # An older backup restored: the log as it was at the early checkpoint.
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER ALL")
        conn.execute("ALTER TABLE log_head DISABLE TRIGGER ALL")
        conn.execute("DELETE FROM events WHERE position > 12")
        conn.execute("UPDATE log_head SET position = 12,"
                     " hash = (SELECT hash FROM events WHERE position = 12)")
        enable_triggers(conn)
    capsys.readouterr()
    rebuild_main(dsn, [])
    assert verify(dsn, capsys)[0] == 0
    status, report = verify(dsn, capsys, "--checkpoint", str(early), "--checkpoint",
                            str(late), "--public-key", str(key_file))
    assert status == 1
    [problem] = report["problems"]
    assert problem["position"] == 13 and str(late) in problem["problem"]
    assert "beyond the log's end at 12" in problem["problem"]


def test_a_tampered_or_foreign_checkpoint_is_refused(
        dsn: str, tmp_path: Path, key: tuple[Ed25519PrivateKey, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    seed(dsn)
    private, key_file = key
    good = take(dsn, private, tmp_path / "good")
    assert verify(dsn, capsys, "--checkpoint", str(good), key_file=key_file)[0] == 0

    forged = json.loads(good.read_text())
    forged["position"] -= 1  # a claim the key never signed
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    status, report = verify(dsn, capsys, "--checkpoint", str(tmp_path / "forged.json"),
                            key_file=key_file)
    assert status == 1 and "signature that does not verify" in report["problems"][0]["problem"]

    stranger = Ed25519PrivateKey.generate()
    foreign = take(dsn, stranger, tmp_path / "foreign")
    status, report = verify(dsn, capsys, "--checkpoint", str(foreign), key_file=key_file)
    assert status == 1 and "not by the given key" in report["problems"][0]["problem"]

    (tmp_path / "broken.json").write_text("{not json")
    status, report = verify(dsn, capsys, "--checkpoint", str(tmp_path / "broken.json"),
                            key_file=key_file)
    assert status == 1 and "cannot be read as JSON" in report["problems"][0]["problem"]


def test_a_checkpoint_of_another_log_does_not_verify(
        dsn: str, empty_dsn: str, tmp_path: Path, key: tuple[Ed25519PrivateKey, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from relay.database import apply_migrations

    apply_migrations(empty_dsn)
    seed(dsn)
    seed(empty_dsn)
    private, key_file = key
    other = take(empty_dsn, private, tmp_path)
    status, report = verify(dsn, capsys, "--checkpoint", str(other), key_file=key_file)
    assert status == 1 and "of another log" in report["problems"][0]["problem"]


def test_checkpoint_command_prints_one_that_verifies_by_hand(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(f"database:\n  dsn: '{dsn}'\n  data_dir: '{tmp_path}'\n")
    done = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "checkpoint"],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["position"] == 1  # the genesis the command created
    # docs/checkpoints.md, "Verifying one by hand"
    public = checkpoint.load_public_key(tmp_path / "signing_key.pem")
    signed = "".join(f"{printed[k]}\n" for k in
                     ("format", "log_id", "position", "head", "time")).encode()
    public.verify(bytes.fromhex(printed["signature"]), signed)
    assert "BEGIN PUBLIC KEY" in done.stderr, "the new key's public half is logged"
    usage = subprocess.run([sys.executable, "-m", "relay", "-c", str(config), "audit",
                            "--checkpoint", str(tmp_path), "--until", "0"],
                           capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert usage.returncode == 2 and "--checkpoint" in usage.stderr
