"""The versioned envelope around every value stored in Redis.

Layout (big-endian), 36 fixed header bytes, the tags, then the caller's value::

    0   u8   marker 0xC6, so a foreign value is never mis-read as data
    1   u8   format version (FORMAT_VERSION)
    2   u64  entry version (monotonic per key write, assigned in Redis by the Set script)
    10  i64  created, milliseconds since the Unix epoch
    18  u32  recompute cost in milliseconds (XFetch; 0 = unknown)
    22  i64  soft expiry, milliseconds since the Unix epoch: the end of the fresh TTL.
             Redis keeps the entry longer only by the class's stale window.
    30  u32  class generation the entry was written under (a class-wide invalidation
             bumps the generation; an entry of an older one reads as a miss)
    34  u16  T, bytes of the tags section
    36  T    tags, each a u16 length and that many bytes of UTF-8
    36+T ... value

Format 3 is format 2 with one more header byte, flags, at offset 36 (the tags follow at
37). It is written only for entries with a flag set, so every other entry stays format 2
and readable by gateways that predate it (they read a format-3 entry as a miss, which is
what it means to them). One flag so far:

    NOT_FOUND (1)  a tombstone: the class's origin said the key does not exist (negative
                   caching, origin.py); the value is empty, the version the origin's

The marker and the entry version sit at fixed offsets in every format, present and
future, so the Lua Set script can read the old version and write the new one without
knowing the rest of the layout. A value whose marker or format version this gateway does
not know is an `EnvelopeError`: the caller treats it as a miss and counts it, never
returns it as data. Format 1 (no generation, no tags) was never deployed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = 0xC6
FORMAT_VERSION = 2
FLAGGED_FORMAT = 3  # format 2 plus a flags byte (written only when a flag is set)
NOT_FOUND = 1  # flag: a tombstone (the origin has no such key)
VERSION_OFFSET = 2
# Where the class generation sits (the Set script stamps the one Redis holds).
GENERATION_OFFSET = 30
_HEADER = struct.Struct(">BBQqIqIH")
HEADER_SIZE = _HEADER.size
# What the Set script prepends: marker, format version and the entry version it assigns.
PREFIX_SIZE = VERSION_OFFSET + 8
_TAG_LEN = struct.Struct(">H")
MAX_TAGS_BYTES = 0xFFFF


class EnvelopeError(ValueError):
    """A stored value is not an envelope this gateway can read."""


@dataclass(frozen=True, slots=True)
class Envelope:
    version: int
    created_ms: int
    cost_ms: int
    soft_expiry_ms: int
    generation: int
    tags: tuple[str, ...]
    value: bytes
    flags: int = 0

    @property
    def not_found(self) -> bool:
        """A tombstone: the origin said the key does not exist."""
        return bool(self.flags & NOT_FOUND)


def _tags_section(tags: Sequence[str]) -> bytes:
    parts: list[bytes] = []
    for tag in tags:
        raw = tag.encode()
        parts += (_TAG_LEN.pack(len(raw)), raw)
    section = b"".join(parts)
    if len(section) > MAX_TAGS_BYTES:
        raise ValueError(f"tags take {len(section)} bytes; at most {MAX_TAGS_BYTES}")
    return section


def encode(
    value: bytes,
    *,
    version: int,
    created_ms: int,
    cost_ms: int = 0,
    soft_expiry_ms: int = 0,
    generation: int = 0,
    tags: Sequence[str] = (),
    flags: int = 0,
) -> bytes:
    section = _tags_section(tags)
    header = _HEADER.pack(
        MAGIC,
        FLAGGED_FORMAT if flags else FORMAT_VERSION,
        version,
        created_ms,
        min(cost_ms, 0xFFFFFFFF),
        soft_expiry_ms,
        generation,
        len(section),
    )
    if flags:
        header += bytes([flags & 0xFF])
    return header + section + value


def encode_tail(
    value: bytes,
    *,
    created_ms: int,
    cost_ms: int = 0,
    soft_expiry_ms: int = 0,
    generation: int = 0,
    tags: Sequence[str] = (),
    flags: int = 0,
) -> bytes:
    """Everything after the entry version; the Set script prepends marker, format
    (`format_of(flags)`) and version."""
    return encode(
        value,
        version=0,
        created_ms=created_ms,
        cost_ms=cost_ms,
        soft_expiry_ms=soft_expiry_ms,
        generation=generation,
        tags=tags,
        flags=flags,
    )[PREFIX_SIZE:]


def format_of(flags: int) -> int:
    return FLAGGED_FORMAT if flags else FORMAT_VERSION


def decode(raw: bytes) -> Envelope:
    if len(raw) < HEADER_SIZE:
        raise EnvelopeError(f"stored value is {len(raw)} bytes, shorter than the envelope header")
    magic, fmt, version, created_ms, cost_ms, soft_expiry_ms, generation, tags_len = (
        _HEADER.unpack_from(raw)
    )
    if magic != MAGIC:
        raise EnvelopeError(f"stored value has marker {magic:#04x}, not a cachegw envelope")
    flags = 0
    start = HEADER_SIZE
    if fmt == FLAGGED_FORMAT:
        if len(raw) <= HEADER_SIZE:
            raise EnvelopeError("stored envelope of format 3 has no flags byte")
        flags = raw[HEADER_SIZE]
        start += 1
    elif fmt != FORMAT_VERSION:
        raise EnvelopeError(
            f"stored envelope has format {fmt}; this gateway reads {FORMAT_VERSION} "
            f"and {FLAGGED_FORMAT}"
        )
    end = start + tags_len
    if len(raw) < end:
        raise EnvelopeError("stored envelope is shorter than its tags section")
    tags: tuple[str, ...] = ()
    if tags_len:
        tags = _decode_tags(raw, start, end)
    return Envelope(
        version, created_ms, cost_ms, soft_expiry_ms, generation, tags, raw[end:], flags
    )


def _decode_tags(raw: bytes, pos: int, end: int) -> tuple[str, ...]:
    out: list[str] = []
    try:
        while pos < end:
            (n,) = _TAG_LEN.unpack_from(raw, pos)
            pos += _TAG_LEN.size
            if pos + n > end:
                raise EnvelopeError("stored envelope has a tag running past its section")
            out.append(raw[pos : pos + n].decode())
            pos += n
    except (struct.error, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"stored envelope has unreadable tags: {exc}") from None
    return tuple(out)
