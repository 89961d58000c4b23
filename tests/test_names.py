"""Room names: one validator (``valid_room``) shared by the wire schema, SSE and admin HTTP."""

from __future__ import annotations

import string

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsfan.server.protocol import CODECS, DecodeFailure, Encoding
from wsfan.server.wire import valid_room

ALLOWED = frozenset(string.ascii_letters + string.digits + "_.:-")


def reference(name: str) -> bool:
    """The rule as PROTOCOL.md states it, without a regex."""
    return 1 <= len(name) <= 128 and all(ch in ALLOWED for ch in name)


@given(st.text(max_size=140) | st.text(alphabet=sorted(ALLOWED) + ["\n", "\r", " ", "é", "٣"], max_size=140))
def test_valid_room_is_exactly_the_documented_rule(name):
    assert valid_room(name) is reference(name)


@given(st.text(alphabet=sorted(ALLOWED) + ["\n", "\x00", "٣"], max_size=130))
def test_schema_and_valid_room_agree(name):
    """The wire schema's pattern and ``valid_room`` cannot drift apart: both encodings decide like it."""
    for encoding in (Encoding.JSON, Encoding.MSGPACK):
        codec = CODECS[encoding]
        raw = codec.encode_value({"type": "leave", "room": name})
        try:
            codec.decode(raw)
            accepted = True
        except DecodeFailure:
            accepted = False
        assert accepted is valid_room(name), (encoding, name)


@pytest.mark.parametrize("name", ["room\n", "room\r\n", "\nroom", "a" * 128 + "\n"])
def test_trailing_or_leading_newline_is_not_a_room(name):
    assert not valid_room(name)
    with pytest.raises(DecodeFailure):
        CODECS[Encoding.JSON].decode(msgspec.json.encode({"type": "join", "room": name}))


@pytest.mark.parametrize("name", ["chat\n", "chat\r\n", "\nchat", "", "a" * 65, "ch at"])
def test_namespace_names_refuse_a_trailing_newline_like_rooms(name):
    """The same ``$`` mistake in the namespace name pattern (operator config): ``\\Z`` now."""
    from wsfan.server.namespaces import Namespace, build

    _, problems = build(Namespace(), {name: {}, "chat": {}})
    assert len(problems) == 1 and "namespace name" in problems[0], problems


@given(st.text(alphabet="ab:", min_size=1, max_size=8))
def test_a_rooms_namespace_is_the_configured_prefix_before_its_first_colon_else_the_default(room):
    """``:`` alone, a leading ``:`` (empty prefix) or a trailing one (``chat:``) are room names like
    any other (PROTOCOL.md's character set); the namespace is the configured prefix before the
    first ``:``, and anything else is the default namespace (docs/protocol-choices.md)."""
    from wsfan.server.namespaces import Namespace, Namespaces

    default, a = Namespace(), Namespace(presence=True)
    spaces = Namespaces(default, {"a": a})
    prefix, sep, _ = room.partition(":")
    assert spaces.of(room) is (a if sep and prefix == "a" else default)


def test_a_repeated_envelope_field_is_taken_from_its_last_occurrence():
    """JSON (RFC 8259 §4: names SHOULD be unique) and MessagePack maps may repeat a key; the
    server reads the last, as JSON.parse and most parsers do (docs/protocol-choices.md)."""
    text = b'{"type":"join","room":"first","room":"last","id":"1"}'
    assert CODECS[Encoding.JSON].decode(text).room == "last"
    packed = b"\x84\xa4type\xa4join\xa4room\xa5first\xa4room\xa4last\xa2id\xa11"
    assert CODECS[Encoding.MSGPACK].decode(packed).room == "last"
