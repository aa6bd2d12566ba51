"""Canonical bytes of an event and the hash chain over them.

The canonical form is what the database keeps (column `events.body`, bytea, exactly
as written) and what the chain hashes, so an auditor can recompute every hash from
the table alone, in any language:

* a JSON object holding `"position"` (the event's place in the log, from 1),
  `"type"` (one of `events.types.EVENT_TYPES`) and every key of the event's data;
* keys sorted by code point, no whitespace (`,` and `:` separators), UTF-8, non-ASCII
  characters written as themselves (not `\\uXXXX` escapes);
* numbers as Python writes them (integers in decimal; floats in their shortest
  round-trip form; NaN and infinities are refused), `null` for None.

Including the position in the bytes means that a row moved to another place (two rows
swapped, a row deleted and the rest renumbered) no longer hashes the same.

The chain: `hash(n) = sha256(hash(n-1) || body(n))`, with `hash(0)` = 32 zero bytes
(`GENESIS_HASH`). A log's first event (`log_created`, events/checkpoint.py) holds 32
random bytes, so that no two logs share a chain and a checkpoint names one log.
`log_head` carries the last position and hash; see `schema/001_event_log.sql` for how
the database enforces both.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import secrets
import struct
from collections.abc import Mapping
from typing import Any

from events.types import EVENT_TYPES, Event

GENESIS_HASH = bytes(32)
RESERVED_KEYS = frozenset({"position", "type"})

_encoder = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
# The C encoder `_encoder.encode` builds afresh on every call, built once: building it is
# a large share of encoding a small event, paid by every appender. Same output; without
# circular-reference markers (event data is flat; a cycle ends in RecursionError).
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_encode = _c_make_encoder and _c_make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", True, False, False)


def _canonical_json(document: Mapping[str, Any]) -> str:
    return "".join(_c_encode(document, 0)) if _c_encode else _encoder.encode(document)


class EventEncodingError(ValueError):
    """An event that cannot be written to the log (unknown type, bad data)."""


def check_event(event: Event) -> None:
    """Refuse, in the appender's thread, what could never be written (JSON: see template)."""
    if event.type not in EVENT_TYPES:
        raise EventEncodingError(f"unknown event type {event.type!r}")
    if not RESERVED_KEYS.isdisjoint(event.data):
        clash = sorted(RESERVED_KEYS.intersection(event.data))
        raise EventEncodingError(f"event data may not use the key(s) {clash}")
    token, run = event.data.get("token"), event.data.get("run")
    if token is not None and (not isinstance(token, str) or "\x00" in token):
        raise EventEncodingError(f"{event.type}: token must be a string without NUL")
    if run is not None and (isinstance(run, bool) or not isinstance(run, int)):
        raise EventEncodingError(f"{event.type}: run must be an integer")


def canonical_bytes(position: int, type_: str, data: Mapping[str, Any]) -> bytes:
    """The bytes stored in `events.body` and hashed into the chain."""
    prefix, suffix = template(type_, data)
    return b"%s%d%s" % (prefix, position, suffix)


# A placeholder position, random per process, so that the one JSON encoding of an
# event can be split where its position goes. Only a nested object with a
# "position" member holding this very number could also match; then (never in
# practice) the exact, slower split below is used.
_MARKER = secrets.randbits(62) | (1 << 62)
_MARKED = b'"position":%d' % _MARKER


def template(type_: str, data: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """Canonical bytes split around the position's value: `prefix + b"42" + suffix`.

    Appenders encode their events before the Journal knows the positions, so the
    work done under the head lock is a concatenation, not a JSON encoding.
    """
    document = dict(data)
    document["position"] = _MARKER
    document["type"] = type_
    try:
        encoded = _canonical_json(document).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise EventEncodingError(f"{type_} data is not canonical JSON: {exc}") from None
    parts = encoded.split(_MARKED)
    if len(parts) == 2:
        return parts[0] + b'"position":', parts[1]
    return _exact_template(type_, data)


def _exact_template(type_: str, data: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The split by construction: keys sort by code point, so the members before
    "position" are exactly the keys below it."""
    before = {key: value for key, value in data.items() if key < "position"}
    after = {key: value for key, value in data.items() if key > "position"}
    after["type"] = type_
    head = _encoder.encode(before)[:-1]  # '{' or '{"a":1,...'
    prefix = head + ('"position":' if len(head) == 1 else ',"position":')
    suffix = "," + _encoder.encode(after)[1:]  # ',"run":1,"type":"..."}'
    return prefix.encode("utf-8"), suffix.encode("utf-8")


def chain_hash(previous: bytes, body: bytes) -> bytes:
    """`sha256(previous || body)`: the hash of the event whose canonical bytes are `body`."""
    return hashlib.sha256(previous + body).digest()


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object of canonical bytes (with its "position" and "type" keys)."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("an event body must be a JSON object")
    return document



# --- PostgreSQL binary COPY ------------------------------------------------------------
# The Journal writes events and projection rows with COPY ... (FORMAT BINARY), encoding
# rows itself: a few byte concatenations per row instead of a generic row adapter.

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension
COPY_TRAILER = b"\xff\xff"
COPY_NULL = b"\xff\xff\xff\xff"
_INT4 = struct.Struct(">i").pack
_INT8_FIELD = struct.Struct(">iq").pack
_INT4_FIELD = struct.Struct(">ii").pack
_FIELD_COUNT = struct.Struct(">h").pack


def copy_row_header(fields: int) -> bytes:
    return _FIELD_COUNT(fields)


def copy_int8(value: int | None) -> bytes:
    return COPY_NULL if value is None else _INT8_FIELD(8, value)


def copy_int4(value: int | None) -> bytes:
    return COPY_NULL if value is None else _INT4_FIELD(4, value)


def copy_bool(value: bool) -> bytes:
    return b"\x00\x00\x00\x01\x01" if value else b"\x00\x00\x00\x01\x00"


def copy_bytes(value: bytes | None) -> bytes:
    """A bytea field, or a text field already encoded as UTF-8."""
    return COPY_NULL if value is None else _INT4(len(value)) + value


def copy_text(value: str | None) -> bytes:
    return COPY_NULL if value is None else copy_bytes(value.encode("utf-8"))
