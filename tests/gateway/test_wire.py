"""The hand-assembled GetMany results parse as protobuf builds them."""

from __future__ import annotations

import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import wire


@pytest.mark.parametrize("ms", [-5, 0, 1, 127, 128, 16_383, 16_384, 10**9, 2**35 - 1, 2**40])
def test_a_fixed_width_ttl_parses_to_the_clamped_value(ms: int) -> None:
    body = wire.hit_body(b"value", 7, "catalog", ["t1"]) + wire.TIER_L1
    ttl = b"".join(wire.ttl_pieces(ms))
    assert len(ttl) == wire.FIXED_TTL_SIZE
    one = pb.GetManyResponse.FromString(b"".join((wire.result_framing(body), body, ttl)))
    (got,) = one.results
    assert got.ttl_remaining_ms == min(max(ms, 0), 2**35 - 1)
    assert (got.value, got.version, got.key_class, list(got.tags)) == (
        b"value",
        7,
        "catalog",
        ["t1"],
    )
    assert got.tier == pb.TIER_L1


def test_results_of_both_kinds_join_in_order() -> None:
    body = wire.hit_body(b"a", 1, "c") + wire.TIER_L1
    miss = wire.miss("c")
    joined = b"".join((wire.result_framing(body), body, *wire.ttl_pieces(1500), wire.result(miss)))
    first, second = pb.GetManyResponse.FromString(joined).results
    assert (first.status, first.value, first.ttl_remaining_ms) == (pb.STATUS_HIT, b"a", 1500)
    assert second.status == pb.STATUS_MISS
