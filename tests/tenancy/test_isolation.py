"""Tenant isolation: two tenants, every RPC, their own and the other's keys.

Both tenants use the same key names on purpose. For every RPC, tenant A acts and the
test asserts that nothing of tenant B was read, changed or revealed: B's values,
counters, limiters, leases, tags and classes are as B left them; B's Subscribe stream
never carries A's events (not even a key name); B's Stats and hot keys count B's calls
only; and in Redis every key of A lives under A's prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.conftest import GatewayFactory, RunningGateway

ALL = '["read", "write", "invalidate", "subscribe", "admin"]'
TOKENS = {"alpha": "cgw_alpha-secret-token", "beta": "cgw_beta-secret-token"}


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def tokens_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tokens.toml"
    entries = [
        f'[[tokens]]\nname = "{tenant}-all"\nhash = "{_hash(token)}"\n'
        f'tenant = "{tenant}"\npermissions = {ALL}\n'
        for tenant, token in TOKENS.items()
    ]
    path.write_text("\n".join(entries) + extra)
    return path


def auth_toml(tokens: Path, tenants: str = "") -> str:
    return (
        f'[auth]\nenabled = true\ntokens_file = "{tokens}"\n'
        '[[classes]]\nname = "tagged"\npatterns = ["tg:*"]\nttl_seconds = 300\n' + tenants
    )


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


class As:
    """Calls on one stub as one tenant."""

    def __init__(self, stub: cache_pb2_grpc.CacheServiceAsyncStub, tenant: str) -> None:
        self.stub = stub
        self.tenant = tenant

    async def __call__(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=md(self.tenant), timeout=5)

    async def value(self, key: str) -> bytes | None:
        r = await self("Get", pb.GetRequest(key=key))
        return r.value if r.status == pb.STATUS_HIT else None


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, tmp_path: Path) -> RunningGateway:
    running: RunningGateway = await gateway_factory(auth_toml(tokens_file(tmp_path)))
    return running


@pytest.fixture
async def two(gw: RunningGateway) -> AsyncIterator[tuple[As, As]]:
    a, b = As(gw.stub, "alpha"), As(gw.stub, "beta")
    for who in (a, b):
        name = who.tenant.encode()
        await who("Set", pb.SetRequest(key="k", value=b"k-" + name))
        await who("Set", pb.SetRequest(key="p:1", value=b"p-" + name))
        await who("Set", pb.SetRequest(key="tg:1", value=b"t-" + name, tags=["shared-tag"]))
        await who("Incr", pb.IncrRequest(key="n", delta=10))
    yield a, b


async def assert_b_untouched(b: As) -> None:
    assert await b.value("k") == b"k-beta"
    assert await b.value("p:1") == b"p-beta"
    assert await b.value("tg:1") == b"t-beta"
    assert (await b("Ttl", pb.TtlRequest(key="k"))).exists
    counter = await b("Incr", pb.IncrRequest(key="n", delta=0))
    assert counter.value == 10


async def test_reads_see_own_values_only(two: tuple[As, As]) -> None:
    a, b = two
    assert await a.value("k") == b"k-alpha" and await b.value("k") == b"k-beta"
    many = await a("GetMany", pb.GetManyRequest(keys=["k", "p:1", "only-beta"]))
    assert [r.value for r in many.results[:2]] == [b"k-alpha", b"p-alpha"]
    await b("Set", pb.SetRequest(key="only-beta", value=b"secret"))
    assert await a.value("only-beta") is None
    assert not (await a("Ttl", pb.TtlRequest(key="only-beta"))).exists


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Set", pb.SetRequest(key="k", value=b"overwritten")),
        ("SetMany", pb.SetManyRequest(entries=[pb.SetRequest(key="p:1", value=b"x")])),
        ("Delete", pb.DeleteRequest(keys=["k", "p:1", "tg:1", "n"])),
        ("DeleteMany", pb.DeleteManyRequest(keys=["k", "p:1", "tg:1", "n"])),
        ("Incr", pb.IncrRequest(key="n", delta=5)),
        ("Touch", pb.TouchRequest(key="k", ttl_ms=1)),
        ("Invalidate", pb.InvalidateRequest(keys=["k"])),
        ("Invalidate", pb.InvalidateRequest(prefixes=["p:", "t", "k"])),
        ("Invalidate", pb.InvalidateRequest(tags=["shared-tag"])),
        ("Invalidate", pb.InvalidateRequest(classes=["tagged", "default"])),
        ("Warmup", pb.WarmupRequest(entries=[pb.WarmupEntry(key="k", value=b"warm")])),
    ],
)
async def test_writes_never_reach_the_other_tenant(
    two: tuple[As, As], method: str, request_: Any
) -> None:
    a, b = two
    await a(method, request_)
    await asyncio.sleep(0.05)  # let any event (there must be none for B) arrive
    await assert_b_untouched(b)


async def test_leases_and_limiters_are_per_tenant(two: tuple[As, As]) -> None:
    a, b = two
    la = await a("Get", pb.GetRequest(key="missing", lease=True))
    lb = await b("Get", pb.GetRequest(key="missing", lease=True))
    assert la.status == pb.STATUS_LEASED and lb.status == pb.STATUS_LEASED  # two holders
    theirs = pb.ReleaseLeaseRequest(key="missing", lease_token=lb.lease_token)
    released = await a("ReleaseLease", theirs)
    assert not released.released  # B's token means nothing in A's space
    limit = pb.RateLimit(rate=1, period_ms=60_000)
    assert (await a("Allow", pb.AllowRequest(key="rl", limit=limit))).allowed
    assert not (await a("Allow", pb.AllowRequest(key="rl", limit=limit))).allowed
    assert (await b("Allow", pb.AllowRequest(key="rl", limit=limit))).allowed


async def test_subscribe_never_shows_the_other_tenants_events(
    gw: RunningGateway, two: tuple[As, As], redis_server: Any
) -> None:
    a, b = two
    stream = gw.stub.Subscribe(pb.SubscribeRequest(), metadata=md("beta"))
    await stream.initial_metadata()
    # Alpha touches keys whose names must not appear anywhere beta can see.
    await a("Set", pb.SetRequest(key="alpha-secret-1", value=b"x"))
    await a("Invalidate", pb.InvalidateRequest(prefixes=["alpha-secret-"], tags=["shared-tag"]))
    await a("Delete", pb.DeleteRequest(keys=["alpha-secret-2"]))
    await b("Invalidate", pb.InvalidateRequest(keys=["beta-marker"]))
    seen: list[pb.InvalidationEvent] = []
    async with asyncio.timeout(5):
        async for event in stream:
            seen.append(event)
            if "beta-marker" in event.keys:
                break
    stream.cancel()
    await asyncio.sleep(0.2)
    text = " ".join(str(e) for e in seen)
    assert "alpha-secret" not in text and "shared-tag" not in text
    # And in Redis: beta's event stream holds no alpha name.
    client = redis.Redis.from_url(redis_server.url)
    try:
        entries = client.xrange("cg:t:beta:events")
        assert entries
        assert "alpha-secret" not in repr(entries)
    finally:
        client.close()


async def test_stats_and_hot_keys_are_per_tenant(two: tuple[As, As]) -> None:
    a, b = two
    for _ in range(30):
        await a.value("k")
        await a.value("alpha-hot")
    before = await b("Stats", pb.StatsRequest(top_keys=50))
    stats_a = await a("Stats", pb.StatsRequest(top_keys=50))
    hot_a = {h.key for h in stats_a.hot_keys}
    assert "alpha-hot" in hot_a
    assert "alpha-hot" not in {h.key for h in before.hot_keys}
    reads_a = sum(c.hits_l1 + c.hits_l2 + c.misses + c.stale for c in stats_a.classes)
    reads_b = sum(c.hits_l1 + c.hits_l2 + c.misses + c.stale for c in before.classes)
    assert reads_a >= 60 and reads_b < 30  # B's own few reads, none of A's sixty
    assert not stats_a.rpcs and stats_a.process.rss_bytes == 0  # gateway-wide: /metrics
    warm = await a("Warmup", pb.WarmupRequest(hot_keys=True))
    assert warm is not None
    assert await b.value("alpha-hot") is None


async def test_redis_keys_live_under_each_tenants_prefix(
    two: tuple[As, As], redis_server: Any
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in client.scan_iter(count=1000)]
    finally:
        client.close()
    values = [k for k in keys if k.endswith("{k}") or k.endswith("{p:1}")]
    assert sorted(values) == sorted(
        ["cg:t:alpha:{k}", "cg:t:alpha:{p:1}", "cg:t:beta:{k}", "cg:t:beta:{p:1}"]
    ), values
    own = ("cg:t:alpha:", "cg:t:beta:", "cg:tenant-streams:", "cg:{tenant-rate:")
    assert all(k.startswith(own) for k in keys), keys


async def test_scoped_token_is_held_to_its_prefixes(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    scoped = "cgw_scoped-token"
    extra = (
        f'\n[[tokens]]\nname = "cart-only"\nhash = "{_hash(scoped)}"\ntenant = "alpha"\n'
        'permissions = ["read", "write", "invalidate", "subscribe"]\nprefixes = ["cart:"]\n'
    )
    gw = await gateway_factory(auth_toml(tokens_file(tmp_path, extra)))
    meta = (("authorization", f"Bearer {scoped}"),)
    await gw.stub.Set(pb.SetRequest(key="cart:1", value=b"c"), metadata=meta)
    for call in (
        gw.stub.Get(pb.GetRequest(key="user:1"), metadata=meta),
        gw.stub.GetMany(pb.GetManyRequest(keys=["cart:1", "user:1"]), metadata=meta),
        gw.stub.Invalidate(pb.InvalidateRequest(tags=["x"]), metadata=meta),
        gw.stub.Invalidate(pb.InvalidateRequest(prefixes=["c"]), metadata=meta),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "cart-only" in (err.value.details() or "")
    # Its data is alpha's: the whole-tenant token reads it.
    assert await As(gw.stub, "alpha").value("cart:1") == b"c"


async def test_rate_quota_answers_resource_exhausted_with_retry_after(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    quota = '[[tenant]]\nname = "alpha"\nrequests_per_second = 5\nburst = 5\n'
    gw = await gateway_factory(auth_toml(tokens_file(tmp_path), quota))
    a, b = As(gw.stub, "alpha"), As(gw.stub, "beta")
    codes = []
    for _ in range(20):  # bounded; far faster than 5/s
        try:
            await a("Get", pb.GetRequest(key="k"))
            codes.append("OK")
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code().name)
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing: dict[str, str] = dict(exc.trailing_metadata() or ())  # type: ignore[arg-type]
            assert int(trailing["retry-after-ms"]) > 0
            assert "alpha" in (exc.details() or "") and "retry after" in (exc.details() or "")
    assert 5 <= codes.count("OK") <= 7, codes
    # Beta has no quota of its own and is not slowed by alpha's.
    for _ in range(20):
        await b("Get", pb.GetRequest(key="k"))


async def test_operators_see_tenants_on_metrics(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    quota = '[[tenant]]\nname = "alpha"\nrequests_per_second = 1\nburst = 1\n'
    gw = await gateway_factory(
        auth_toml(tokens_file(tmp_path), quota), telemetry__metrics_listen="127.0.0.1:0"
    )
    a, b = As(gw.stub, "alpha"), As(gw.stub, "beta")
    await a("Set", pb.SetRequest(key="k", value=b"v"))
    await b("Set", pb.SetRequest(key="k", value=b"v"))
    with pytest.raises(grpc.aio.AioRpcError):
        await a("Get", pb.GetRequest(key="k"))
    address = gw.server.metrics_address
    assert address is not None
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    )
    assert "cachegw_tenants 2.0" in text
    assert 'cachegw_tenant_quota_refused_total{quota="rate",tenant="alpha"} 1.0' in text
    assert 'cachegw_tenant_quota_refused_total{quota="rate",tenant="beta"} 0.0' in text
    # The gateway-wide counts add up both tenants' Sets.
    sets = [ln for ln in text.splitlines() if ln.startswith("cachegw_sets_total")]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in sets) == 2


async def test_a_gateway_holds_at_most_max_per_gateway_tenants(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway_factory(auth_toml(tokens_file(tmp_path), "[tenants]\nmax_per_gateway = 1\n"))
    assert await As(gw.stub, "alpha").value("k") is None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await As(gw.stub, "beta").value("k")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenants.max_per_gateway" in (err.value.details() or "")
    # Each tenant's L1 is its share of the gateway's bound.
    assert gw.server.tenants is not None
    alpha = gw.server.tenants.tenants["alpha"].space
    assert alpha.l1.stats()["max_bytes"] == gw.server.config.l1.max_bytes
