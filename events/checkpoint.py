"""Signed checkpoints: the log's head, signed with the relay's Ed25519 key, kept outside
the database.

A hash chain proves nothing against whoever can rewrite the whole chain (a superuser
can disable the guard triggers, change a body and recompute every later hash and the
head). A checkpoint taken before the rewrite still names the old hash at its position,
and its signature shows the relay made it, so `relay audit --verify --checkpoint`
catches the rewrite, and a rollback to an older backup (the checkpoint's position is
then beyond the log's end). See docs/checkpoints.md for the format and how to check
one by hand.

The signed message is plain text, one field per line, so any Ed25519 library verifies it:

    apns-relay-checkpoint/1\\n<log_id>\\n<position>\\n<head>\\n<time>\\n

`log_id` is the genesis value of the log's first event (log_created, 32 random bytes,
hex) or, for a log written before log_created existed, the hash of its first event;
`head` is the hex hash of the event at `position`; `time` is ISO 8601 UTC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from events import types as ev
from events.batch_sql import append_first
from relay.database import connect

log = logging.getLogger(__name__)

FORMAT = "apns-relay-checkpoint/1"
FIELDS = ("format", "log_id", "position", "head", "time", "key_id", "signature")


class CheckpointError(Exception):
    """A checkpoint or key that cannot be used; the message names it."""


def create_log(dsn: str) -> bool:
    """Give an empty log its genesis (the first event, log_created, with 32 random bytes);
    True when this call wrote it. Decided under the head lock: one genesis per log."""
    return append_first(dsn, ev.log_created(ev.now_ms(), secrets.token_bytes(32)))


# --- keys ------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at `path` (PEM, PKCS #8); created (mode 0600) when absent."""
    try:
        return load_private_key(path)
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting together never overwrite each other's key;
        # O_NOFOLLOW: a symlink planted at the path is refused, not written through.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return load_private_key(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    log.warning("created the checkpoint signing key %s; its public key (keep a copy where "
                "auditors can find it): %s", path, public_pem(key.public_key()).strip())
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or the public half of a PEM private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the key ({exc.strerror})") from None
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError(f"{path}: not an Ed25519 public key")
    return key


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# --- checkpoints -------------------------------------------------------------------------


def message(log_id: str, position: int, head: str, time: str) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return f"{FORMAT}\n{log_id}\n{position}\n{head}\n{time}\n".encode()


def log_id(cur: psycopg.Cursor[Any]) -> str | None:
    """The log's id (see the module docstring); None for an empty log."""
    row = cur.execute("SELECT type, body, hash FROM events WHERE position = 1",
                      binary=True).fetchone()
    if row is None:
        return None
    type_, body, hash_ = row
    if type_ == ev.LOG_CREATED:
        genesis = json.loads(bytes(body)).get("genesis")
        if isinstance(genesis, str):
            return genesis
    return bytes(hash_).hex()


def take(conn: psycopg.Connection[Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A signed checkpoint of the log's head now (one snapshot for head and log id)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = cur.execute("SELECT position, hash FROM log_head").fetchone()
        assert row is not None, "log_head has exactly one row"
        identity = log_id(cur)
    if identity is None:
        raise CheckpointError("the log is empty: there is nothing to checkpoint")
    position, head = int(row[0]), bytes(row[1]).hex()
    time = ev.iso_ms(ev.now_ms())
    signature = key.sign(message(identity, position, head, time))
    return {"format": FORMAT, "log_id": identity, "position": position, "head": head,
            "time": time, "key_id": key_id(key.public_key()), "signature": signature.hex()}


def write(directory: Path, checkpoint: dict[str, Any]) -> Path:
    """Store a checkpoint as `checkpoint-<position>.json` (atomically: written, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-{checkpoint['position']:012d}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(checkpoint, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


@dataclass(frozen=True)
class Loaded:
    source: str  # the file it came from
    checkpoint: dict[str, Any] | None  # None: unreadable (see `problem`)
    problem: str | None = None


def load(sources: list[Path]) -> list[Loaded]:
    """Every checkpoint in the given files and directories (`*.json` in a directory)."""
    loaded: list[Loaded] = []
    for source in sources:
        files = sorted(source.glob("*.json")) if source.is_dir() else [source]
        if source.is_dir() and not files:
            loaded.append(Loaded(str(source), None, "holds no checkpoint (*.json)"))
        for path in files:
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                loaded.append(Loaded(str(path), None, f"cannot be read as JSON ({exc})"))
                continue
            problem = _shape_problem(document)
            loaded.append(Loaded(str(path), None if problem else document, problem))
    return loaded


def _shape_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "is not a JSON object"
    missing = [name for name in FIELDS if name not in document]
    if missing:
        return f"lacks {', '.join(missing)}"
    if document["format"] != FORMAT:
        return f"has format {document['format']!r}, not {FORMAT!r}"
    position = document["position"]
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        return "has a position that is not a whole number >= 0"
    if not all(isinstance(document[name], str) for name in FIELDS if name != "position"):
        return "has a field that is not a string"
    return None


def signature_problem(checkpoint: dict[str, Any], public: Ed25519PublicKey) -> str | None:
    """Why the checkpoint's signature does not verify with `public`, or None."""
    if checkpoint["key_id"] != key_id(public):
        return (f"was signed by key {checkpoint['key_id']}, not by the given key "
                f"{key_id(public)}")
    try:
        signature = bytes.fromhex(checkpoint["signature"])
        public.verify(signature, message(checkpoint["log_id"], checkpoint["position"],
                                         checkpoint["head"], checkpoint["time"]))
    except (ValueError, InvalidSignature):
        return "has a signature that does not verify: it was altered or forged"
    return None


def verify(cur: psycopg.Cursor[Any], log_end: int, loaded: list[Loaded],
           public: Ed25519PublicKey) -> list[tuple[int | None, str]]:
    """(position, problem) for every checkpoint this log contradicts: unreadable, badly
    signed, of another log, beyond the log's end (rolled back), or naming another hash
    at its position (rewritten). `log_end` is the last position the audit replayed."""
    identity = log_id(cur)
    valid = [item for item in loaded if item.checkpoint is not None]
    positions = [item.checkpoint["position"] for item in valid if item.checkpoint]
    stored = {position: bytes(hash_).hex() for position, hash_ in cur.execute(
        "SELECT position, hash FROM events WHERE position = ANY(%s)", (positions,),
        binary=True)}
    problems: list[tuple[int | None, str]] = [
        (None, f"checkpoint {item.source} {item.problem}") for item in loaded
        if item.checkpoint is None]
    for item in valid:
        checkpoint = item.checkpoint
        assert checkpoint is not None
        position = checkpoint["position"]
        name = f"checkpoint {item.source} (position {position})"
        if (problem := signature_problem(checkpoint, public)) is not None:
            problems.append((position, f"{name} {problem}"))
        elif checkpoint["log_id"] != identity:
            problems.append((None, f"{name} is of another log: its log id is "
                             f"{checkpoint['log_id']}, this log's is {identity}"))
        elif position > log_end:
            problems.append((position, f"{name} is beyond the log's end at {log_end}: the "
                             "log was rolled back (an older backup restored?) or cut short"))
        elif stored.get(position) != checkpoint["head"]:
            problems.append((position, f"{name} names hash {checkpoint['head']} at position "
                             f"{position}, the log has {stored.get(position)}: history up "
                             "to there was rewritten"))
    return problems


class Checkpoints:
    """A relay process's checkpoints: one after every run, written to `directory`
    (`audit.checkpoint_dir`) and the latest kept for `GET /log/checkpoint`. A failure to
    take one is logged, never fatal: the next run takes another."""

    def __init__(self, dsn: str, directory: Path, key_file: Path) -> None:
        self._dsn, self._directory = dsn, directory
        self._key = load_or_create_key(key_file)
        self._latest: dict[str, Any] | None = None

    def latest(self) -> dict[str, Any] | None:
        return self._latest

    def take(self) -> None:
        try:
            with connect(self._dsn, application_name="relay-checkpoint") as conn:
                taken = take(conn, self._key)
            path = write(self._directory, taken)
        except (psycopg.Error, OSError, CheckpointError) as exc:
            log.warning("no checkpoint after this run: %s", exc)
            return
        self._latest = taken
        log.info("checkpoint of position %d written to %s", taken["position"], path)
