"""Hand-assembled pieces of cachegw.v1 messages for the read path.

A protobuf message may carry its fields in any order and a parser keeps the last value
of a repeated scalar, so a GetResponse can be glued together from a body encoded once
when the entry is cached plus the few fields that change per call (tier, remaining
TTL). That keeps the L1-hit path free of protobuf object construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachegw.v1 import cache_pb2 as pb

# GetResponse field tags (field number << 3 | wire type).
_TIER_TAG = b"\x18"  # 3, varint
_TTL_TAG = 0x30  # 6, varint
# GetManyResponse.results (1, length-delimited).
_RESULT_TAG = b"\x0a"

TIER_L1 = _TIER_TAG + bytes([pb.TIER_L1])
TIER_L2 = _TIER_TAG + bytes([pb.TIER_L2])

_SMALL_TTL = [bytes([_TTL_TAG, n]) for n in range(0x80)]

# A GetMany result from L1 carries its TTL as a fixed-width field: the tag and a varint
# padded to 5 bytes (protobuf parsers accept redundant continuation bytes, as the
# encoding spec requires), so that the result's length, and the length prefix in front of
# it, are known when the entry is cached. The field is assembled from three table pieces
# (14 + 14 + 7 bits of milliseconds, up to 2^35 ms: over a year) without arithmetic per
# byte: `ttl_pieces(ms)` returns them for bytes.join.
FIXED_TTL_SIZE = 6
_TTL_LOW = [bytes([_TTL_TAG, (n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80]) for n in range(1 << 14)]
_TTL_MID = [bytes([(n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80]) for n in range(1 << 14)]
_TTL_HIGH = [bytes([n]) for n in range(0x80)]
_TTL_MAX = (1 << 35) - 1
TTL_TABLES = (_TTL_LOW, _TTL_MID, _TTL_HIGH)


def varint(n: int) -> bytes:
    """Unsigned base-128 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def ttl_field(ms: int) -> bytes:
    """GetResponse.ttl_remaining_ms; 0 (the default) is omitted as protobuf would."""
    if ms <= 0:
        return b""
    if ms < 0x80:
        return _SMALL_TTL[ms]
    return bytes([_TTL_TAG]) + varint(ms)


def ttl_pieces(ms: int) -> tuple[bytes, bytes, bytes]:
    """GetResponse.ttl_remaining_ms in FIXED_TTL_SIZE bytes, as three pieces."""
    if ms <= 0:
        ms = 0
    elif ms > _TTL_MAX:
        ms = _TTL_MAX
    return _TTL_LOW[ms & 0x3FFF], _TTL_MID[(ms >> 14) & 0x3FFF], _TTL_HIGH[ms >> 28]


def result_framing(body: bytes) -> bytes:
    """What goes before `body` + a fixed-width TTL as one GetManyResponse.results entry."""
    return _RESULT_TAG + varint(len(body) + FIXED_TTL_SIZE)


def result(answer: bytes) -> bytes:
    """One encoded GetResponse as a GetManyResponse.results entry."""
    return _RESULT_TAG + varint(len(answer)) + answer


def hit_body(value: bytes, version: int, key_class: str, tags: Sequence[str] = ()) -> bytes:
    """A HIT GetResponse without tier and TTL, to be completed per answer."""
    return pb.GetResponse(
        status=pb.STATUS_HIT, value=value, version=version, key_class=key_class, tags=tags
    ).SerializeToString()


def answer(
    status: pb.Status.ValueType,
    *,
    key_class: str,
    tier: pb.Tier.ValueType = pb.TIER_L2,
    value: bytes = b"",
    version: int = 0,
    ttl_ms: int = 0,
    tags: Sequence[str] = (),
    lease_token: bytes = b"",
    refresh: bool = False,
) -> bytes:
    """Any GetResponse, built the ordinary way (the rarer answers: STALE, LEASED, refresh)."""
    return pb.GetResponse(
        status=status,
        value=value,
        tier=tier,
        lease_token=lease_token,
        refresh=refresh,
        ttl_remaining_ms=max(ttl_ms, 0),
        version=version,
        key_class=key_class,
        tags=tags,
    ).SerializeToString()


def miss(key_class: str) -> bytes:
    return pb.GetResponse(
        status=pb.STATUS_MISS, tier=pb.TIER_ORIGIN, key_class=key_class
    ).SerializeToString()
