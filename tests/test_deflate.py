"""permessage-deflate (RFC 7692) negotiation and codec, sans-I/O (server/deflate.py).

The end-to-end behaviour (a real server, real clients, Autobahn 12.* and 13.*) is
tested in test_compression.py; these tests pin the rules of each function.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsfan.server.deflate import TAIL, Agreement, CorruptData, TooLarge, compress, inflate, negotiate

BOTH = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    ("offer", "expected"),
    [
        # what browsers send
        (["permessage-deflate; client_max_window_bits"], Agreement(15, BOTH)),
        (["permessage-deflate"], Agreement(15, BOTH)),
        (["PerMessage-Deflate ; Client_No_Context_Takeover"], Agreement(15, BOTH)),
        (["permessage-deflate; server_no_context_takeover"], Agreement(15, BOTH)),
        (["permessage-deflate; client_max_window_bits=10"], Agreement(15, BOTH)),
        (['permessage-deflate; client_max_window_bits="12"'], Agreement(15, BOTH)),
        # the server compresses with a smaller window when asked to (§7.1.2.1)
        (
            ["permessage-deflate; server_max_window_bits=10"],
            Agreement(10, BOTH + "; server_max_window_bits=10"),
        ),
        # one header line, several offers: the first acceptable one wins (§5.1)
        (
            ["permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=12"],
            Agreement(12, BOTH + "; server_max_window_bits=12"),
        ),
        # several header lines combine, in order (RFC 6455 §9.1)
        (["x-webkit-deflate-frame", "permessage-deflate"], Agreement(15, BOTH)),
    ],
)
def test_acceptable_offers(offer: list[str], expected: Agreement) -> None:
    assert negotiate(offer) == expected


@pytest.mark.parametrize(
    "offer",
    [
        [],
        [""],
        ["x-webkit-deflate-frame"],
        ["permessage-deflate; server_max_window_bits=8"],  # zlib cannot write an 8-bit window
        ["permessage-deflate; server_max_window_bits"],  # needs a value
        ["permessage-deflate; server_max_window_bits=16"],
        ["permessage-deflate; server_max_window_bits=010"],  # no leading zeros
        ["permessage-deflate; server_max_window_bits=1²"],  # ASCII digits only
        ["permessage-deflate; client_max_window_bits=7"],
        ["permessage-deflate; server_no_context_takeover=1"],  # takes no value
        ["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],  # repeated
        ["permessage-deflate; mystery=1"],  # unknown parameter
    ],
)
def test_declined_offers(offer: list[str]) -> None:
    assert negotiate(offer) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=4))
def test_negotiate_never_raises_and_answers_only_what_it_can_honour(lines: list[str]) -> None:
    result = negotiate(lines)
    if result is not None:
        assert 9 <= result.window_bits <= 15
        assert result.response.startswith(BOTH)


@pytest.mark.parametrize("bits", [9, 12, 15])
def test_compressed_message_inflates_to_the_original_in_any_receiver(bits: int) -> None:
    data = b'{"type":"message","room":"r","seq":1,"payload":"' + b"hello " * 100 + b'"}'
    wire = compress(data, bits)
    assert not wire.endswith(TAIL) and len(wire) < len(data) / 4
    # a receiver with exactly the window it asked for reads it (§7.1.2.1)
    assert zlib.decompressobj(-bits).decompress(wire + TAIL) == data
    assert inflate(wire, len(data)) == data


def test_compression_is_deterministic_so_one_frame_serves_every_subscriber() -> None:
    data = b"x" * 1000 + bytes(range(256))
    assert compress(data) == compress(data)


def test_inflate_stops_a_decompression_bomb_at_the_limit() -> None:
    bomb = compress(b"\0" * 50_000_000)  # 50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    with pytest.raises(TooLarge):
        inflate(bomb, 65536)
    assert inflate(compress(b"a" * 65536), 65536) == b"a" * 65536  # exactly the limit passes


def test_inflate_refuses_corrupt_data() -> None:
    with pytest.raises(CorruptData, match="^invalid permessage-deflate data$"):
        inflate(b"\xff\xff\xff\xff garbage", 1000)


def test_inflate_takes_rfc_7692s_final_block_example_and_refuses_data_after_a_final_block() -> None:
    """RFC 7692 §7.2.3.4's "Hello" in a final block plus one 0x00 octet inflates; anything more
    after the final block (a second stream, junk) is refused instead of dropped."""
    hello = bytes([0xF3, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00, 0x00])
    assert inflate(hello, 1000) == b"Hello"
    assert inflate(hello[:-1], 1000) == b"Hello"  # the final block alone
    for extra in (b"\x01", b"\x00\x00", hello[:-1], compress(b"more")):
        with pytest.raises(CorruptData, match="^data after the final deflate block$"):
            inflate(hello + extra, 1000)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_inflate_of_any_bytes_returns_or_raises_only_its_two_errors(data: bytes) -> None:
    try:
        out = inflate(data, 1024)
    except (TooLarge, CorruptData):
        return
    assert len(out) <= 1024
