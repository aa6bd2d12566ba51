"""HPACK for APNs traffic: the library's codec with a fast path for the common header block.

Header encoding and decoding were the largest CPU cost per notification on both ends of
the wire (the relay and the simulator). An APNs header block is always the same shape:
a few constant fields (method, scheme, authority, topic, push type, priority; or
`:status 200`) that sit in the HPACK tables, plus per-request values sent as
never-indexed literals (path, apns-id, expiration, provider token; docs/apns.md §1).
Both classes handle exactly that shape themselves and hand everything else (the first
block of a connection, which fills the dynamic table, table size updates, Huffman
strings) to `hpack`, so the compression state is the library's and stays correct.
Literals are never Huffman-coded: the values are unique per request, so Huffman would
cost both ends CPU on every request for ~50 bytes saved.
"""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, HeaderTuple, HPACKError, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]

# RFC 7541 §6.2.3: the "literal header field never indexed" flag.
_NEVER_INDEXED = 0x10
# Static-table entries by name, for literals whose name is indexed (e.g. :path, authorization).
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAMES.setdefault(_name, _index)


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1 integer with `flags` in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """RFC 7541 §5.2 string literal, not Huffman-coded."""
    return _integer(len(data), 7, 0) + data


def never_indexed_name(name: bytes) -> bytes:
    """The start of a never-indexed field: the static-table index of `name`, else `name`."""
    index = _STATIC_NAMES.get(name)
    if index is None:
        return bytes((_NEVER_INDEXED,)) + _string(name)
    return _integer(index, 4, _NEVER_INDEXED)


class HeaderEncoder(Encoder):  # type: ignore[misc]
    """Never-indexed fields are written directly; other fields are remembered as the
    index the library chose for them, until the dynamic table changes (an insertion
    shifts every dynamic index) or its size does. Headers are bytes, as h2 passes them."""

    def __init__(self) -> None:
        super().__init__()
        self._indexed: dict[Header, bytes] = {}
        self._never_indexed_names: dict[bytes, bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if self.header_table.resized:  # the library must signal the new size first
            self._indexed.clear()
            return bytes(super().encode(headers, huffman=False))
        indexed, names = self._indexed, self._never_indexed_names
        block = []
        for header in headers:
            if type(header) is NeverIndexedHeaderTuple or (len(header) > 2 and header[2]):
                name, value = header[0], header[1]
                start = names.get(name)
                if start is None:
                    start = names[name] = never_indexed_name(name)
                block.append(start)
                block.append(_string(value))
                continue
            encoded = indexed.get(header)
            if encoded is None:
                encoded = self._add(header)
            block.append(encoded)
        return b"".join(block)

    def _add(self, header: Header) -> bytes:
        table = self.header_table.dynamic_entries
        size, newest = len(table), table[0] if table else None
        key = (bytes(header[0]), bytes(header[1]))
        encoded = bytes(super().add(key, False, False))
        if len(table) == size and (table[0] if table else None) is newest:
            self._indexed[key] = encoded  # no insertion: an index that stays valid
        else:
            self._indexed.clear()  # the dynamic indexes moved
        return encoded


class HeaderDecoder(Decoder):  # type: ignore[misc]
    """Decodes indexed fields and plain (not Huffman-coded) literals that do not touch
    the dynamic table; any other block is decoded by the library from its start (the
    fast path changes no state, so starting over is safe)."""

    def decode(self, data: bytes, raw: bool = False) -> Any:
        headers = self._decode_simple(data) if raw else None
        if headers is None:
            return super().decode(data, raw=raw)
        return headers

    def _decode_simple(self, data: bytes) -> list[HeaderTuple] | None:
        table = self.header_table
        headers: list[HeaderTuple] = []
        size = 0
        end = len(data)
        pos = 0
        try:
            while pos < end:
                first = data[pos]
                if first & 0x80:  # indexed field
                    index, pos = _read_integer(data, pos, 7)
                    name, value = table.get_by_index(index)
                    header = HeaderTuple(name, value)
                elif first & 0xE0:  # incremental indexing or a size update: the library's
                    return None
                else:  # without indexing (0000) or never indexed (0001)
                    index, pos = _read_integer(data, pos, 4)
                    if index:
                        name = table.get_by_index(index)[0]
                    else:
                        name, pos = _read_string(data, pos)
                    value, pos = _read_string(data, pos)
                    header = (NeverIndexedHeaderTuple if first & _NEVER_INDEXED
                              else HeaderTuple)(name, value)
                size += 32 + len(header[0]) + len(header[1])
                headers.append(header)
        except (IndexError, ValueError, HPACKError):
            return None  # malformed or unusual: the library decides, and raises
        if size > self.max_header_list_size or self.header_table_size > self.max_allowed_table_size:
            return None  # the library raises the error these deserve
        return headers


def _read_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise ValueError("HPACK integer too long")


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    if data[pos] & 0x80:
        raise ValueError("Huffman-coded")  # the library decodes those
    length, pos = _read_integer(data, pos, 7)
    if pos + length > len(data):
        raise ValueError("truncated string")
    return bytes(data[pos:pos + length]), pos + length
