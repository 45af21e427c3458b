"""The versioned envelope around every value stored in Redis.

Layout (big-endian), 30 header bytes then the caller's value::

    0   u8   marker 0xC6, so a foreign value is never mis-read as data
    1   u8   format version (FORMAT_VERSION)
    2   u64  entry version (monotonic per key write, assigned in Redis by the Set script)
    10  i64  created, milliseconds since the Unix epoch
    18  u32  recompute cost in milliseconds (XFetch; 0 = unknown)
    22  i64  soft expiry, milliseconds since the Unix epoch (0 = none)
    30  ...  value

The marker and the entry version sit at fixed offsets in every format, present and
future, so the Lua Set script can read the old version and write the new one without
knowing the rest of the layout. A value whose marker or
format version this gateway does not know is an `EnvelopeError`: the caller treats it
as a miss and counts it, never returns it as data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0xC6
FORMAT_VERSION = 1
VERSION_OFFSET = 2
_HEADER = struct.Struct(">BBQqIq")
HEADER_SIZE = _HEADER.size
# What the Set script prepends: marker, format version and the entry version it assigns.
PREFIX_SIZE = VERSION_OFFSET + 8


class EnvelopeError(ValueError):
    """A stored value is not an envelope this gateway can read."""


@dataclass(frozen=True, slots=True)
class Envelope:
    version: int
    created_ms: int
    cost_ms: int
    soft_expiry_ms: int
    value: bytes


def encode_tail(
    value: bytes, *, created_ms: int, cost_ms: int = 0, soft_expiry_ms: int = 0
) -> bytes:
    """Everything after the entry version; the Set script prepends marker, format and version."""
    return (
        _HEADER.pack(MAGIC, FORMAT_VERSION, 0, created_ms, cost_ms, soft_expiry_ms)[PREFIX_SIZE:]
        + value
    )


def encode(
    value: bytes, *, version: int, created_ms: int, cost_ms: int = 0, soft_expiry_ms: int = 0
) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, version, created_ms, cost_ms, soft_expiry_ms) + value


def decode(raw: bytes) -> Envelope:
    if len(raw) < HEADER_SIZE:
        raise EnvelopeError(f"stored value is {len(raw)} bytes, shorter than the envelope header")
    magic, fmt, version, created_ms, cost_ms, soft_expiry_ms = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise EnvelopeError(f"stored value has marker {magic:#04x}, not a cachegw envelope")
    if fmt != FORMAT_VERSION:
        raise EnvelopeError(
            f"stored envelope has format {fmt}; this gateway reads {FORMAT_VERSION}"
        )
    return Envelope(version, created_ms, cost_ms, soft_expiry_ms, raw[HEADER_SIZE:])
