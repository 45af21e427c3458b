"""What the gateway charges an L1 entry (no Redis needed): the Python objects it holds as
allocated, plus the native L1's own memory for the entry, its groups and their names, so
that `l1.max_bytes` bounds the memory the entries take (benchmarks/bench_l1_memory.py
measures it against RSS). Stats and metrics show the L1's `nbytes`, hence the charge."""

from __future__ import annotations

import sys
import time

from cachegw_gateway.config import L1Config
from cachegw_gateway.envelope import Envelope
from cachegw_gateway.l1tier import L1Tier, L1Value, entry_charge, new_l1
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import ClassCounters, GatewayStats
from cachegw_native.l1 import (
    ENTRY_OVERHEAD,
    GROUP_OVERHEAD,
    MEMBERSHIP_OVERHEAD,
    allocated,
)

KC = KeyClass("catalog", 60_000, 0.0, True, 60_000, 1 << 20, stale_if_error_ms=60_000)


def group(name: str) -> int:
    return GROUP_OVERHEAD + allocated(sys.getsizeof(name))


def test_the_gateway_l1_charges_its_own_memory() -> None:
    l1 = new_l1(L1Config(max_entries=100, max_bytes=1 << 20, admission="tinylfu"))
    assert l1.charge_overhead and l1.admission == "tinylfu" and l1.max_bytes == 1 << 20


def test_an_entry_is_charged_its_objects_and_the_l1_structures() -> None:
    l1 = new_l1(L1Config(max_entries=100, max_bytes=1 << 20))
    tier = L1Tier(l1, GatewayStats())
    tier.resume_fills()
    env = Envelope(7, 0, 0, 0, 0, ("sku-1", "page-0"), b"v" * 10)
    tier.fill("catalog:1", KC, env, 60_000, time.monotonic())
    value: L1Value = l1.get("catalog:1")  # type: ignore[assignment]
    body, fresh_until, _, framing = value
    objects = sum(
        allocated(sys.getsizeof(obj)) for obj in ("catalog:1", value, body, fresh_until, framing)
    )
    assert entry_charge("catalog:1", value) == objects
    # 10 bytes of value take hundreds: the key, the tuple, the answer, the deadline, the
    # framing, the slot and indexes, three memberships and three groups with their names.
    groups = group("c:catalog") + group("t:sku-1") + group("t:page-0")
    expected = objects + ENTRY_OVERHEAD + 3 * MEMBERSHIP_OVERHEAD + groups
    assert l1.nbytes == l1.stats()["bytes"] == expected
    assert expected > 600


def test_the_byte_bound_holds_for_small_values() -> None:
    """Tiny values: the bound now counts hundreds of bytes per entry (it counted about
    140), so a 64 KiB L1 holds about 130 of them, not 470."""
    l1 = new_l1(L1Config(max_entries=10_000, max_bytes=64 * 1024))
    tier = L1Tier(l1, GatewayStats())
    tier.resume_fills()
    for i in range(1000):
        env = Envelope(i + 1, 0, 0, 0, 0, (), b"v" * 10)
        tier.fill(f"catalog:{i:06}", KC, env, 60_000, time.monotonic())
        assert l1.nbytes <= l1.max_bytes
    assert 100 < len(l1) < 200


def test_last_known_copies_are_charged_the_same_way() -> None:
    last = LastKnown(100, 1 << 20)
    assert last.copies.charge_overhead
    env = Envelope(300, 0, 0, 0, 0, ("sku-1",), b"v" * 10)
    last.keep("catalog:1", KC, env, 1000, time.monotonic(), ClassCounters(), ("c:catalog",))
    copy = last.copies.get("catalog:1")
    assert isinstance(copy, tuple)
    objects = sum(
        allocated(sys.getsizeof(obj))
        for obj in ("catalog:1", copy, env.value, env.version, env.tags, "sku-1")
    )
    expected = objects + ENTRY_OVERHEAD + MEMBERSHIP_OVERHEAD + group("c:catalog")
    assert last.copies.nbytes == expected
