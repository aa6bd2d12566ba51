"""What a well-formed event body holds, per type and version: the audit's check that an
event can be read by the rules that fold it.

The hash chain proves that bytes were not changed after they were written; it says
nothing about whether they were right when written (a bug, or a writer that recomputed
the chain). `problem` names what is wrong with one body: a missing or unexpected field,
a value of the wrong JSON type (`"run": true` or `5.0` where a whole number belongs);
`canonical_problem` says whether the stored bytes are the canonical encoding of what
they hold (events/codec.py), so that one fact has exactly one byte form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Optional, TypedDict

import msgspec
import orjson

from events import codec
from events import types as ev

_STR = (str,)
_INT = (int,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_NUMBER = (float, int)

_COMMON = {"position": _INT, "type": _STR}
# Per type: every field with its JSON types (bool is not int here: `type(v) in kinds`).
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    ev.LOG_CREATED: {"at": _STR, "genesis": _STR},
    ev.DEVICE_REGISTERED: {"token": _STR, "at": _STR},
    ev.DEVICE_UNREGISTERED: {"token": _STR, "at": _STR, "cause": _STR,
                             "apple_timestamp_ms": _OPT_INT, "run": _OPT_INT,
                             "apns_id": _OPT_STR},
    ev.UNREGISTER_SKIPPED: {"token": _STR, "at": _STR, "cause": _STR, "run": _OPT_INT,
                            "apple_timestamp_ms": _OPT_INT, "verdict_at": _STR,
                            "registered_at": _OPT_STR, "why": _STR},
    ev.RUN_STARTED: {"run": _INT, "at": _STR, "tokens": _INT},
    ev.RUN_FINISHED: {"run": _INT, "at": _STR, "tokens": _INT, "delivered": _INT,
                      "failed": _INT, "abandoned": _INT, "unregistered": _INT},
    ev.NOTIFICATION_DELIVERED: {"run": _INT, "token": _STR, "at": _STR, "attempt": _INT,
                                "apns_id": _STR, "status": _INT, "latency_ms": _NUMBER},
    ev.NOTIFICATION_FAILED: {"run": _INT, "token": _STR, "at": _STR, "attempt": _INT,
                             "apns_id": _STR, "status": _OPT_INT, "reason": _OPT_STR,
                             "verdict": _STR, "apple_timestamp_ms": _OPT_INT,
                             "latency_ms": _NUMBER, "next_attempt_at": _OPT_STR},
    ev.NOTIFICATION_ABANDONED: {"run": _INT, "token": _STR, "at": _STR, "attempts": _INT,
                                "apns_id": _STR, "last_reason": _OPT_STR},
    ev.RELAY_HALTED: {"at": _STR, "halt_class": _STR, "reason": _OPT_STR,
                      "status": _OPT_INT, "message": _STR, "run": _OPT_INT,
                      "token": _OPT_STR},
    ev.SHARD_LEASED: {"at": _STR, "process": _STR, "host": _STR, "shard": _INT,
                      "epoch": _INT, "took_from": _OPT_STR},
    ev.SHARD_RELEASED: {"at": _STR, "process": _STR, "host": _STR, "shard": _INT,
                        "epoch": _INT, "why": _STR},
}
_FENCE: dict[str, tuple[type, ...]] = {"shard": _INT, "epoch": _INT}
# Later versions and optional fields (events/types.py, EVENT VERSIONS).
_LATER: dict[str, list[dict[str, tuple[type, ...]]]] = {
    ev.RUN_FINISHED: [{"dead": _INT, "kept": _INT, "v": _INT}],
    ev.RUN_STARTED: [{"apns": (dict, type(None))}],
    ev.NOTIFICATION_DELIVERED: [_FENCE],
    ev.NOTIFICATION_FAILED: [_FENCE],
    ev.NOTIFICATION_ABANDONED: [_FENCE],
}
# Every accepted shape, keyed by its exact set of fields.
_SHAPES: dict[str, dict[frozenset[str], dict[str, tuple[type, ...]]]] = {}
for _type, _fields in _FIELDS.items():
    _variants = [{**_COMMON, **_fields}]
    _variants += [{**_COMMON, **_fields, **extra} for extra in _LATER.get(_type, [])]
    _SHAPES[_type] = {frozenset(variant): variant for variant in _variants}


def problem(doc: Mapping[str, Any]) -> str | None:
    """What makes this body malformed, or None."""
    shapes = _SHAPES.get(doc.get("type"))  # type: ignore[arg-type]
    if shapes is None:
        return f"unknown event type {doc.get('type')!r}"
    shape = shapes.get(frozenset(doc))
    if shape is None:
        fields = min(shapes, key=len)
        missing = sorted(fields - doc.keys())
        extra = sorted(doc.keys() - set().union(*shapes))
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unknown field(s) {', '.join(extra)}"] if extra else [])
        return f"a {doc['type']} that " + (" and ".join(parts) or "mixes two versions' fields")
    for name, kinds in shape.items():
        if type(doc[name]) not in kinds:
            return f"a {doc['type']} whose {name} is {orjson.dumps(doc[name]).decode()}"
    if doc["type"] == ev.RUN_FINISHED and "v" in doc and doc["v"] != ev.RUN_FINISHED_VERSION:
        return f"a run_finished of unknown version {doc['v']}"
    if doc["type"] == ev.RUN_STARTED and isinstance(apns := doc.get("apns"), dict) and not all(
            isinstance(apns.get(k), (str, type(None))) for k in ("environment", "endpoint")):
        return "a run_started whose apns is not {environment, endpoint}"
    return None


# --- the fast path ----------------------------------------------------------------------
# The audit checks every event, so the common case must cost no more than the parse it
# replaces: a validating decoder per type (msgspec, in C) parses the body and checks its
# fields and their types in one pass (strict: `true` or `5.0` is no whole number), and
# writing the result back with sorted keys must give the very same bytes (canonical, no
# unknown field: the decoder drops those). A body that fails either is not necessarily
# bad (a float written with another exponent, an integer beyond 64 bits):
# `problem` and `canonical_problem` then decide exactly.

_ANNOTATIONS = {_STR: str, _INT: int, _OPT_STR: Optional[str], _OPT_INT: Optional[int],  # noqa: UP045
                _NUMBER: float, (dict, type(None)): Optional[dict[str, Any]]}  # noqa: UP045


_TYPED_DICT: Any = TypedDict  # built at run time from the shapes above


def _decoder(type_: str) -> msgspec.json.Decoder[Any]:
    required = {name: _ANNOTATIONS[kinds] for name, kinds in {**_COMMON, **_FIELDS[type_]}.items()}
    later = {name: _ANNOTATIONS[kinds] for extra in _LATER.get(type_, [])
             for name, kinds in extra.items()}
    # A later version's fields are optional here; `problem` checks the combination.
    optional = _TYPED_DICT(f"{type_}_later", later, total=False)
    shape = type(f"{type_}_shape", (optional,), {"__annotations__": required})
    return msgspec.json.Decoder(shape, strict=True)


DECODERS: dict[str, msgspec.json.Decoder[Any]] = {type_: _decoder(type_) for type_ in _FIELDS}
ENCODE = msgspec.json.Encoder(order="sorted").encode
INVALID = (msgspec.ValidationError, msgspec.DecodeError)


def body_problem(doc: dict[str, Any], body: bytes) -> str | None:
    """What is wrong with a body that missed the fast path, or None."""
    found = problem(doc)
    if found is None and canonical_problem(doc, body):
        found = "bytes that are not the canonical encoding of what they hold"
    return found


_SORTED = orjson.OPT_SORT_KEYS


def canonical_problem(doc: dict[str, Any], body: bytes) -> bool:
    """True when `body` is not the canonical encoding of `doc` (what it decodes to)."""
    with contextlib.suppress(TypeError):  # orjson refuses integers beyond 64 bits
        if orjson.dumps(doc, option=_SORTED) == body:  # the same bytes for most events
            return False
    data = {k: v for k, v in doc.items() if k not in codec.RESERVED_KEYS}
    try:  # orjson and Python write some floats differently: the definition decides
        return codec.canonical_bytes(doc["position"], doc["type"], data) != body
    except (codec.EventEncodingError, TypeError, KeyError):
        return True
