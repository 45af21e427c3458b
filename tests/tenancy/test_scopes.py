"""Key-prefix scopes (scopes.py): what a scoped token may name, RPC by RPC."""

from __future__ import annotations

import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.scopes import OutOfScope, check, narrow_subscribe

SCOPES = ("cart:", "session:")


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Get", pb.GetRequest(key="cart:1")),
        ("Set", pb.SetRequest(key="session:x", value=b"v")),
        ("GetMany", pb.GetManyRequest(keys=["cart:1", "session:2"])),
        ("DeleteMany", pb.DeleteManyRequest(keys=["cart:1"])),
        ("SetMany", pb.SetManyRequest(entries=[pb.SetRequest(key="cart:2")])),
        ("Invalidate", pb.InvalidateRequest(keys=["cart:1"], prefixes=["cart:eu:"])),
        ("Warmup", pb.WarmupRequest(keys=["cart:1"], prefixes=["session:"])),
        ("Stats", pb.StatsRequest()),
        ("Incr", pb.IncrRequest(key="cart:n", delta=1)),
        ("Allow", pb.AllowRequest(key="session:rl")),
    ],
)
def test_in_scope_passes(method: str, request_: object) -> None:
    check(method, request_, SCOPES, "t")


@pytest.mark.parametrize(
    ("method", "request_", "names"),
    [
        ("Get", pb.GetRequest(key="user:1"), "'user:1'"),
        ("Ttl", pb.TtlRequest(key="car"), "'car'"),
        ("GetMany", pb.GetManyRequest(keys=["cart:1", "user:2"]), "keys[1]"),
        ("Delete", pb.DeleteRequest(keys=["user:1"]), "keys[0]"),
        ("SetMany", pb.SetManyRequest(entries=[pb.SetRequest(key="x")]), "entries.key"),
        # A prefix wider than the scope reaches other keys.
        ("Invalidate", pb.InvalidateRequest(prefixes=["ca"]), "prefixes[0]"),
        ("Invalidate", pb.InvalidateRequest(tags=["t"]), "tag invalidation"),
        ("Invalidate", pb.InvalidateRequest(classes=["default"]), "class invalidation"),
        ("Warmup", pb.WarmupRequest(hot_keys=True), "hot keys"),
        ("Warmup", pb.WarmupRequest(entries=[pb.WarmupEntry(key="u")]), "entries.key"),
        ("Stats", pb.StatsRequest(top_keys=10), "top_keys"),
        ("ReleaseLease", pb.ReleaseLeaseRequest(key="lock"), "'lock'"),
    ],
)
def test_out_of_scope_is_refused_with_what_and_why(
    method: str, request_: object, names: str
) -> None:
    with pytest.raises(OutOfScope) as err:
        check(method, request_, SCOPES, "reader")
    assert names in str(err.value)
    assert "'reader'" in str(err.value) and "nothing was done" in str(err.value)


def test_subscribe_is_narrowed_to_the_scopes() -> None:
    everything = narrow_subscribe(pb.SubscribeRequest(since="1-0"), SCOPES, "t")
    assert list(everything.prefixes) == list(SCOPES) and everything.since == "1-0"
    inside = narrow_subscribe(pb.SubscribeRequest(prefixes=["cart:eu:"]), SCOPES, "t")
    assert list(inside.prefixes) == ["cart:eu:"]
    wider = narrow_subscribe(pb.SubscribeRequest(prefixes=["ca", "s"]), SCOPES, "t")
    assert list(wider.prefixes) == ["cart:", "session:"]
    with pytest.raises(OutOfScope, match="shares no key"):
        narrow_subscribe(pb.SubscribeRequest(prefixes=["user:"]), SCOPES, "t")
