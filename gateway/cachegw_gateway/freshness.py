"""How fresh a stored entry is, and the encoded Get answers built from it.

Freshness is read off Redis's own clock: a class with a stale window of S ms stores
each value for its fresh TTL + S, so ``PTTL - S`` is the fresh time left (no wall clock
of any gateway is trusted). An entry written under an older class generation is dead
(Invalidate(class) bumped it). These are pure functions of an entry, its class and the
class generations this gateway knows; the read path and the lease protocol share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cache

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope, wire
from cachegw_gateway.l2 import L2Entry
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import ClassCounters

FRESH, STALE, DEAD = 0, 1, 2

# XFetch: with fresh time left above cost * beta * ln(1000), a caller is picked to refresh
# with probability under 0.1 %, so L1 may serve the key until then.
XFETCH_HORIZON = math.log(1000)
# Recompute cost assumed for an entry written without a lease (none was measured).
DEFAULT_COST_MS = 100


class Generations:
    """The class generations this gateway last saw in Redis (Invalidate(class) bumps one).

    Learned from every read and class invalidation; a stored entry of another generation
    than the one known here is dead."""

    __slots__ = ("_gens",)

    def __init__(self) -> None:
        self._gens: dict[str, int] = {}

    def __getitem__(self, key_class: str) -> int:
        return self._gens.get(key_class, 0)

    def update(self, seen: Mapping[str, int]) -> None:
        self._gens.update(seen)


def judge(entry: L2Entry, kc: KeyClass, generation: int) -> tuple[int, int]:
    """(FRESH | STALE | DEAD, fresh milliseconds left) of a stored entry. A tombstone
    (a cached NOT_FOUND) is never STALE: past its negative TTL it is dead."""
    if entry.envelope.generation != generation:
        return DEAD, 0
    if entry.pttl_ms < 0:  # no expiry: not written by a gateway; served, never copied
        return FRESH, 0
    fresh_left = entry.pttl_ms - kc.keep_ms
    if fresh_left > 0:
        return FRESH, fresh_left
    # Past its fresh life: in the stale window (stale_seconds), or kept only for
    # fail-safe (see `kept_for_fail_safe`), which is DEAD to every other reader.
    stale = kc.stale_ms > 0 and -fresh_left <= kc.stale_ms and not entry.envelope.flags
    return (STALE if stale else DEAD), 0


def kept_for_fail_safe(entry: L2Entry, kc: KeyClass, generation: int) -> bool:
    """Whether an entry past its fresh life may still be answered STALE by fail-safe:
    a value (not a tombstone) of the class's generation, at most fail_safe_ms past its
    fresh life (failsafe.py)."""
    if not kc.fail_safe_ms or entry.envelope.flags or entry.pttl_ms < 0:
        return False
    if entry.envelope.generation != generation:
        return False
    past = kc.keep_ms - entry.pttl_ms
    return 0 <= past <= kc.fail_safe_ms


def count_found(counters: ClassCounters, entry: L2Entry) -> None:
    """Count a FRESH entry answered from Redis: a hit, or a cached NOT_FOUND."""
    if entry.envelope.not_found:
        counters.not_found += 1
    else:
        counters.hits_l2 += 1


def xfetch(
    env: envelope.Envelope, kc: KeyClass, fresh_left_ms: int, rand: Callable[[], float]
) -> bool:
    """Probabilistic early expiration: refresh now with a probability that rises as
    expiry nears, faster for values that take long to recompute."""
    if fresh_left_ms <= 0:  # no expiry known (not written by a gateway): nothing to beat
        return False
    cost = env.cost_ms or DEFAULT_COST_MS
    return -cost * kc.early_refresh_beta * math.log(1.0 - rand()) >= fresh_left_ms


def l1_horizon_ms(env: envelope.Envelope, kc: KeyClass, fresh_left_ms: int) -> float:
    """How long an L1 copy may live: its class's L1 TTL, the entry's fresh life left, and
    the time before XFetch might pick a refresher (a copy must not hide that moment)."""
    horizon = float(fresh_left_ms)
    if kc.early_refresh_beta > 0:
        horizon -= (env.cost_ms or DEFAULT_COST_MS) * kc.early_refresh_beta * XFETCH_HORIZON
    return min(float(kc.l1_ttl_ms), horizon)


# -- answers ------------------------------------------------------------------------------


def hit(kc: KeyClass, entry: L2Entry, fresh_left_ms: int) -> bytes:
    """The answer for a FRESH entry: HIT, or NOT_FOUND for a tombstone."""
    env = entry.envelope
    if env.not_found:
        return not_found(kc, env.version, fresh_left_ms, pb.TIER_L2)
    body = wire.hit_body(env.value, env.version, kc.name, env.tags)
    return body + wire.TIER_L2 + wire.ttl_field(fresh_left_ms)


def not_found(kc: KeyClass, version: int, ttl_ms: int, tier: pb.Tier.ValueType) -> bytes:
    """The origin has no such key: just now (tier ORIGIN) or as cached (tier L2)."""
    return wire.answer(
        pb.STATUS_NOT_FOUND, key_class=kc.name, tier=tier, version=version, ttl_ms=ttl_ms
    )


def with_status(
    status: pb.Status.ValueType,
    kc: KeyClass,
    entry: L2Entry,
    ttl_ms: int,
    lease_token: bytes = b"",
) -> bytes:
    """A HIT or STALE answer, with the refresh lease when this caller was picked."""
    env = entry.envelope
    return wire.answer(
        status,
        key_class=kc.name,
        value=env.value,
        version=env.version,
        ttl_ms=ttl_ms,
        tags=env.tags,
        lease_token=lease_token,
        refresh=bool(lease_token),
    )


def leased(kc: KeyClass, token: bytes) -> bytes:
    return wire.answer(pb.STATUS_LEASED, tier=pb.TIER_ORIGIN, key_class=kc.name, lease_token=token)


@cache
def _miss(key_class: str) -> bytes:
    return wire.miss(key_class)


def miss(kc: KeyClass) -> bytes:
    return _miss(kc.name)
