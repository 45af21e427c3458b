"""Hand-assembled pieces of cachegw.v1 messages for the read path.

A protobuf message may carry its fields in any order and a parser keeps the last value
of a repeated scalar, so a GetResponse can be glued together from a body encoded once
when the entry is cached plus the few fields that change per call (tier, remaining
TTL). That keeps the L1-hit path free of protobuf object construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cachegw.v1 import cache_pb2 as pb

# GetResponse field tags (field number << 3 | wire type).
_TIER_TAG = b"\x18"  # 3, varint
_TTL_TAG = 0x30  # 6, varint
# GetManyResponse.results (1, length-delimited).
_RESULT_TAG = b"\x0a"

TIER_L1 = _TIER_TAG + bytes([pb.TIER_L1])
TIER_L2 = _TIER_TAG + bytes([pb.TIER_L2])

_SMALL_TTL = [bytes([_TTL_TAG, n]) for n in range(0x80)]


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


def get_many(results: Iterable[bytes]) -> bytes:
    """A GetManyResponse from encoded GetResponse messages, in order."""
    parts: list[bytes] = []
    for r in results:
        parts += (_RESULT_TAG, varint(len(r)), r)
    return b"".join(parts)
