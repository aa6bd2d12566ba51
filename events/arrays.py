"""Array parameters in PostgreSQL's binary form, built from COPY fields.

A small batch travels as column arrays (`unnest(%b::int8[], ...)`). psycopg adapts a
Python list by inspecting its elements on every call, which was the largest part of the
Journal's CPU per lone commit (about 40 % under cProfile, eight arrays per commit). An
element of a binary array is laid out exactly as a field of binary COPY (length, bytes;
-1 for NULL: `events.codec.copy_*`), so the arrays are joined from those fields here and
handed to psycopg as bytes that carry their array type.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from psycopg import adapters
from psycopg.adapt import Dumper
from psycopg.pq import Format

from events import codec

_HEADER = struct.Struct(">iiiii").pack  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct(">iii").pack  # no dimensions, no nulls, element type


class BinaryArray(bytes):
    """A one-dimensional array, binary; subclasses name its type for psycopg."""

    element_oid = 0
    array_oid = 0


class Int8Array(BinaryArray):
    element_oid, array_oid = 20, 1016


class Int4Array(BinaryArray):
    element_oid, array_oid = 23, 1007


class BoolArray(BinaryArray):
    element_oid, array_oid = 16, 1000


class TextArray(BinaryArray):
    element_oid, array_oid = 25, 1009


class ByteaArray(BinaryArray):
    element_oid, array_oid = 17, 1001


def array(kind: type[BinaryArray], fields: list[bytes]) -> BinaryArray:
    """`kind` from COPY fields (one per element, in order)."""
    if not fields:
        return kind(_EMPTY(0, 0, kind.element_oid))
    has_null = codec.COPY_NULL in fields
    return kind(_HEADER(1, has_null, kind.element_oid, len(fields), 1) + b"".join(fields))


# The COPY field encoder of each array kind, for callers that hold Python values.
FIELD: dict[type[BinaryArray], Callable[[object], bytes]] = {
    Int8Array: codec.copy_int8,  # type: ignore[dict-item]
    Int4Array: codec.copy_int4,  # type: ignore[dict-item]
    BoolArray: codec.copy_bool,  # type: ignore[dict-item]
    TextArray: codec.copy_text,  # type: ignore[dict-item]
    ByteaArray: codec.copy_bytes,  # type: ignore[dict-item]
}


def of_values(kind: type[BinaryArray], values: Iterable[object]) -> BinaryArray:
    """`kind` from Python values (None for NULL)."""
    encode = FIELD[kind]
    return array(kind, [encode(value) for value in values])


def _register(kind: type[BinaryArray]) -> None:
    class _Dumper(Dumper):
        format = Format.BINARY
        oid = kind.array_oid

        def dump(self, obj: object) -> bytes:
            assert isinstance(obj, bytes)
            return obj

    adapters.register_dumper(kind, _Dumper)


for _kind in (Int8Array, Int4Array, BoolArray, TextArray, ByteaArray):
    _register(_kind)
