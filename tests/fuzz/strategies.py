"""Hypothesis strategies for fuzzing the wire: request messages built from the protobuf
descriptors (valid encodings whose values sit where bugs hide), mutations of their
encodings, and raw bytes.

Strings favour what a Redis key is built from (l2.py): NUL and control characters,
Redis glob characters, Cluster hash-tag braces, backslashes, non-ASCII text, and lengths
around the gateway's key limit. Integers favour the limits of their protobuf type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

# The pieces of a key that l2.py escapes, tags or matches on.
SPECIAL = [
    "\x00",
    "\x01",
    "\t",
    "\n",
    "\r",
    "\x1b",
    "\x7f",
    "*",
    "?",
    "[",
    "]",
    "[a-z]",
    "[^a]",
    "\\",
    "\\*",
    "{",
    "}",
    "{}",
    "}{",
    "{a}",
    ":",
    ":lease",
    "}:lease",
    ":n",
    ":rl",
    "meta",
    "wb:",
    "tag:",
    "gen:",
    " ",
    "é",
    "\u2028",
    "\ufeff",
    "😀",
    "\U0010ffff",
]

DEFAULT_MAX_KEY = 512  # server.max_key_bytes by default


def edgy_text(max_key_bytes: int = DEFAULT_MAX_KEY, max_pieces: int = 8) -> st.SearchStrategy[str]:
    """Short strings assembled from the special pieces and ordinary text, plus strings at
    and around the key length limit (in bytes, with multi-byte characters too)."""
    pieces = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=4))
    # Mostly short enough to be a valid key, so that the call goes past validation.
    assembled = st.lists(pieces, min_size=1, max_size=max_pieces).map("".join)
    at_limit = st.builds(
        lambda n, c: c * max(0, n // len(c.encode())),
        st.sampled_from([max_key_bytes - 1, max_key_bytes, max_key_bytes + 1, max_key_bytes * 4]),
        st.sampled_from(["k", "é", "😀", "{", "*", "\x00"]),
    )
    return st.one_of(assembled, assembled, assembled, at_limit, st.just(""))


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, hi, lo + 1, hi - 1, 0, 1, -1, 2**31 - 1, 2**32 - 1, 2**53, 2**63 - 1})
    small = st.integers(max(lo, 1), min(hi, 5_000))  # what most fields accept
    return st.one_of(
        st.sampled_from([v for v in edges if lo <= v <= hi]),
        st.integers(lo, hi),
        st.integers(max(lo, -10_000), min(hi, 10_000)),
        small,
        small,
    )


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _ints(*INT32),
    FieldDescriptor.TYPE_SINT32: _ints(*INT32),
    FieldDescriptor.TYPE_SFIXED32: _ints(*INT32),
    FieldDescriptor.TYPE_INT64: _ints(*INT64),
    FieldDescriptor.TYPE_SINT64: _ints(*INT64),
    FieldDescriptor.TYPE_SFIXED64: _ints(*INT64),
    FieldDescriptor.TYPE_UINT32: _ints(*UINT32),
    FieldDescriptor.TYPE_FIXED32: _ints(*UINT32),
    FieldDescriptor.TYPE_UINT64: _ints(*UINT64),
    FieldDescriptor.TYPE_FIXED64: _ints(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True),
}


def _bytes_value() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"\x00", b"0", b"-1", b"\xff" * 40, b"v" * 1025]),
        edgy_text().map(lambda s: s.encode()),
    )


Overrides = Mapping[str, st.SearchStrategy[Any]]


def _scalar(
    field: FieldDescriptor, max_key_bytes: int, overrides: Overrides
) -> st.SearchStrategy[Any]:
    if field.name in overrides:
        return overrides[field.name]
    if field.type == FieldDescriptor.TYPE_STRING:
        return edgy_text(max_key_bytes)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes_value()
    if field.type == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: any int32 is carried, known or not.
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(*INT32))
    return _SCALARS[field.type]


@st.composite
def _message(
    draw: st.DrawFn,
    descriptor: Descriptor,
    max_key_bytes: int,
    max_items: int,
    depth: int,
    overrides: Overrides,
) -> Message:
    msg = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # no request carries a map
        if field.is_repeated:
            if field.message_type is not None:
                if depth <= 0:
                    continue
                item = _message(field.message_type, max_key_bytes, max_items, depth - 1, overrides)
                for sub in draw(st.lists(item, max_size=max_items)):
                    getattr(msg, field.name).add().CopyFrom(sub)
            else:
                values = draw(
                    st.lists(_scalar(field, max_key_bytes, overrides), max_size=max_items)
                )
                getattr(msg, field.name).extend(values)
            continue
        if not draw(st.booleans()):  # absent (or the default, for a plain proto3 field)
            continue
        if field.message_type is not None:
            if depth > 0:
                sub = draw(
                    _message(field.message_type, max_key_bytes, max_items, depth - 1, overrides)
                )
                getattr(msg, field.name).CopyFrom(sub)
            continue
        setattr(msg, field.name, draw(_scalar(field, max_key_bytes, overrides)))
    return msg


def messages(
    cls: type[Message],
    max_key_bytes: int = DEFAULT_MAX_KEY,
    max_items: int = 6,
    overrides: Overrides | None = None,
) -> st.SearchStrategy[Message]:
    """Valid messages of `cls` whose fields hold edgy values (see the module docstring);
    `overrides` gives the strategy of scalar fields by name (e.g. known class names)."""
    descriptor: Descriptor = cls.DESCRIPTOR  # type: ignore[assignment]
    return _message(descriptor, max_key_bytes, max_items, 3, overrides or {})


# -- encodings that are not (quite) valid -------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    n &= 2**64 - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_HUGE_VARINTS = [
    b"\xff" * 9 + b"\x01",  # 2^64 - 1
    b"\xff" * 10 + b"\x01",  # 11 bytes: too long for a varint
    b"\x80" * 9 + b"\x00",  # a padded zero
    b"\xff" * 4 + b"\x0f",  # 2^32 - 1
    b"\x80\x80\x80\x80\x08",  # 2^31
]


@st.composite
def _field_bytes(draw: st.DrawFn) -> bytes:
    """One field of any number and wire type, well or badly formed."""
    number = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 16, 99, 536870911, 0]))
    wire = draw(st.integers(0, 7))  # 3, 4 are groups, 6 and 7 do not exist
    tag = varint((number << 3) | wire)
    if wire == 0:
        body = draw(
            st.one_of(st.sampled_from(_HUGE_VARINTS), st.integers(0, 2**64 - 1).map(varint))
        )
    elif wire == 1:
        body = draw(st.binary(min_size=8, max_size=8))
    elif wire == 5:
        body = draw(st.binary(min_size=4, max_size=4))
    elif wire == 2:
        payload = draw(
            st.one_of(
                st.binary(max_size=32),
                st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x00", b"\xf4\x90"]),
            )
        )
        length = draw(st.sampled_from([len(payload)] * 4 + [len(payload) + 1, 2**31, 2**64 - 1]))
        body = varint(length) + payload
    else:
        body = draw(st.binary(max_size=8))
    return tag + body


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` after a few byte-level mutations or spliced-in odd fields."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "field", "field"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[min(at, len(data) - 1)]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(_field_bytes())
    return bytes(data)


def wire_inputs(
    cls: type[Message], max_key_bytes: int = DEFAULT_MAX_KEY, overrides: Overrides | None = None
) -> st.SearchStrategy[bytes]:
    """What a request deserializer may be handed: valid encodings, mutated ones, odd
    fields alone, and raw random bytes."""
    valid = messages(cls, max_key_bytes, overrides=overrides).map(lambda m: m.SerializeToString())
    return st.one_of(
        valid,
        valid.flatmap(mutated),
        st.lists(_field_bytes(), min_size=1, max_size=4).map(b"".join),
        st.binary(max_size=256),
    )
