"""The HPACK fast paths (`relay.apns.hpack_codec`) against the `hpack` library itself."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple, OversizedHeaderListError
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.apns.hpack_codec import HeaderDecoder, HeaderEncoder

names = st.sampled_from([b":path", b"apns-id", b"authorization", b"apns-topic", b"x-custom",
                         b"content-type", b":status"])
values = st.binary(min_size=0, max_size=300)
header = st.tuples(names, values, st.booleans())
blocks = st.lists(st.lists(header, min_size=1, max_size=8), min_size=1, max_size=6)


def _tuples(block: list[tuple[bytes, bytes, bool]]) -> list[HeaderTuple]:
    return [NeverIndexedHeaderTuple(n, v) if never else HeaderTuple(n, v)
            for n, v, never in block]


@settings(max_examples=150, deadline=None)
@given(blocks, st.sampled_from([None, 0, 256, 4096]))
def test_our_encoding_decodes_to_the_same_headers(
        stream: list[list[tuple[bytes, bytes, bool]]], table_size: int | None) -> None:
    encoder, library = HeaderEncoder(), Decoder()
    for number, block in enumerate(stream):
        if table_size is not None and number == 1:
            encoder.header_table_size = table_size  # a size update mid-connection
        headers = _tuples(block)
        decoded = library.decode(encoder.encode(headers), raw=True)
        assert [tuple(h) for h in decoded] == [tuple(h) for h in headers]
        if table_size is None or number != 1:  # (the library encodes the resizing block)
            assert [type(h) for h in decoded] == [type(h) for h in headers]


@settings(max_examples=150, deadline=None)
@given(blocks, st.booleans())
def test_we_decode_what_the_library_encodes(stream: list[list[tuple[bytes, bytes, bool]]],
                                            huffman: bool) -> None:
    library, ours, reference = Encoder(), HeaderDecoder(), Decoder()
    for block in stream:
        data = library.encode(_tuples(block), huffman=huffman)
        assert ours.decode(data, raw=True) == reference.decode(data, raw=True)
    assert ours.header_table.dynamic_entries == reference.header_table.dynamic_entries


def test_a_request_block_after_the_first_is_indexes_and_literals() -> None:
    encoder = HeaderEncoder()
    constant = [(b":method", b"POST"), (b"apns-topic", b"org.example.wallet")]
    first = encoder.encode([*constant, NeverIndexedHeaderTuple(b"apns-id", b"1")])
    second = encoder.encode([*constant, NeverIndexedHeaderTuple(b"apns-id", b"2")])
    assert len(second) < len(first)
    # :method POST is static index 3; the topic is the one dynamic entry (index 62).
    assert second[:2] == bytes([0x80 | 3, 0x80 | 62])
    assert second[2:] == b"\x10\x07apns-id\x012"  # never indexed, literal name, no Huffman


def test_oversized_header_lists_are_refused() -> None:
    decoder = HeaderDecoder()
    decoder.max_header_list_size = 100
    data = HeaderEncoder().encode([NeverIndexedHeaderTuple(b"x", b"y" * 200)])
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(data, raw=True)


def test_sensitive_three_tuples_stay_out_of_the_table() -> None:
    encoder, decoder = HeaderEncoder(), Decoder()
    block = encoder.encode([(b"authorization", b"bearer x", True), (b"x-custom", b"1")])
    assert decoder.decode(block, raw=True) == [(b"authorization", b"bearer x"), (b"x-custom", b"1")]
    assert [name for name, _ in encoder.header_table.dynamic_entries] == [b"x-custom"]
