"""What the token check costs on the hit path ([auth] enabled), in one run.

  (a) the wrap alone: auth.Authenticator.wrap around a trivial async handler, called
      directly with a context that carries the metadata a real call has (user-agent,
      the authorization header, two more), against the bare handler; a static token
      and a signed token (both remembered after their first check), time per call;
  (b) through a gateway: the L1-hit Get over real gRPC (grpc.aio stub, one channel,
      concurrency 1 and 16) to two in-process gateways on one Redis, one with [auth]
      on (a static token), one without; cases interleaved round by round, medians.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_auth.py            # about 30 s
    .venv/bin/python benchmarks/bench_auth.py --quick    # a few seconds (smoke test)

The aims are in AIMS below; a missed aim makes the script exit 1. Client and gateways
share one process and event loop in (b), so the ratio is of the whole call as this
machine serves it, not of the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import jwt

from benchmarks.harness import Aim, check_aims, render_table
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.auth import Authenticator
from cachegw_gateway.config import AuthConfig, load_config
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.server import GatewayServer
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.tokens import entry_text, new_token

SECRET = "b" * 64
AIMS = [
    # The check's own cost (a) against the whole L1-hit Get without auth (b, concurrency 1).
    Aim("token check on the hit path", "wrap's extra time / L1-hit Get", "<=", 2.0, "%"),
    Aim("L1-hit Get, concurrency 1", "with auth / without (time per call)", "<=", 1.10),
    Aim("L1-hit Get, concurrency 16", "with auth / without (time per call)", "<=", 1.10),
]


class FakeContext:
    """What the wrap reads of a grpc.aio context on the hit path."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"refused: {code} {details}")


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (
        ("user-agent", "grpc-python/1.85 grpc-c/50.0 (linux; chttp2)"),
        ("grpc-accept-encoding", "identity,deflate,gzip"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("authorization", f"Bearer {token}"),
    )


async def time_calls(call: Callable[[], Awaitable[Any]], n: int) -> float:
    """Seconds per call over n calls (the best of three runs)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            await call()
        best = min(best, (time.perf_counter() - start) / n)
    return best


async def bench_wrap(work: Path, n: int) -> dict[str, float]:
    token = new_token()
    tokens = work / "tokens.toml"
    tokens.write_text(
        entry_text(
            name="bench",
            token=token,
            tenant="shop",
            permissions=["read"],
            prefixes=[],
            expires=None,
        )
    )
    key = work / "jwt.key"
    key.write_text(SECRET)
    config = AuthConfig(enabled=True, tokens_file=str(tokens), jwt_key_file=str(key))
    authn = Authenticator(config, GatewayStats())
    signed = jwt.encode(
        {"tenant": "shop", "permissions": ["read"], "exp": int(time.time()) + 3600},
        SECRET,
        algorithm="HS256",
    )

    async def handler(request: Any, context: Any) -> bytes:
        return b"answer"

    plain = grpc.unary_unary_rpc_method_handler(handler)
    wrapped = cast(Any, authn.wrap("Get", plain).unary_unary)
    assert wrapped is not None
    request = pb.GetRequest(key="k")
    static_ctx, jwt_ctx = FakeContext(metadata(token)), FakeContext(metadata(signed))
    bare_ctx = FakeContext(metadata(token)[:3])
    figures = {
        "bare handler": await time_calls(lambda: handler(request, bare_ctx), n),
        "wrap, static token": await time_calls(lambda: wrapped(request, static_ctx), n),
        "wrap, signed token": await time_calls(lambda: wrapped(request, jwt_ctx), n),
    }
    # A first check (nothing remembered): one hash, or one signature.
    figures["first check, static token"] = await time_calls(
        lambda: _first(authn, f"Bearer {token}"), max(1, n // 20)
    )
    figures["first check, signed token"] = await time_calls(
        lambda: _first(authn, f"Bearer {signed}"), max(1, n // 20)
    )
    return figures


async def _first(authn: Authenticator, header: str) -> None:
    authn._cache.clear()
    authn.principal_for(header)


async def bench_gateways(work: Path, rounds: int, seconds: float) -> dict[str, list[float]]:
    token = new_token()
    tokens = work / "gw-tokens.toml"
    tokens.write_text(
        entry_text(
            name="bench",
            token=token,
            tenant="shop",
            permissions=["read", "write"],
            prefixes=[],
            expires=None,
        )
    )
    toml = work / "cachegw.toml"
    toml.write_text("")
    with ManagedRedis() as redis:
        servers = {}
        for name, extra in (("without", {}), ("with", {"auth.enabled": True})):
            config = load_config(
                toml,
                env={},
                overrides={
                    "redis.url": redis.url,
                    "server.listen": "127.0.0.1:0",
                    "redis.prefix": f"bench{name}",
                    "auth.tokens_file": str(tokens),
                    **extra,
                },
            )
            servers[name] = GatewayServer(config, redis.url)
            await servers[name].start()
        try:
            return await _interleave(servers, token, rounds, seconds)
        finally:
            for server in servers.values():
                await server.stop(grace=0)


async def _interleave(
    servers: dict[str, GatewayServer], token: str, rounds: int, seconds: float
) -> dict[str, list[float]]:
    md = (("authorization", f"Bearer {token}"),)
    channels = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    stubs: dict[str, cache_pb2_grpc.CacheServiceAsyncStub] = {
        name: cache_pb2_grpc.CacheServiceStub(ch) for name, ch in channels.items()
    }
    request = pb.GetRequest(key="hot")
    for name, stub in stubs.items():
        await stub.Set(pb.SetRequest(key="hot", value=b"v" * 100), metadata=md)
        for _ in range(3):
            reply = await stub.Get(request, metadata=md)
        assert reply.tier == pb.TIER_L1, f"{name}: not an L1 hit"
    out: dict[str, list[float]] = {}
    try:
        for i in range(rounds):
            for concurrency in (1, 16):
                # Alternate which goes first: a drift in the machine's load within a
                # round then favours neither.
                for name in ("with", "without") if i % 2 else ("without", "with"):
                    per_call = await _load(stubs[name], request, md, concurrency, seconds)
                    out.setdefault(f"{name} auth, concurrency {concurrency}", []).append(per_call)
    finally:
        for ch in channels.values():
            await ch.close(None)
    return out


async def _load(
    stub: cache_pb2_grpc.CacheServiceAsyncStub,
    request: pb.GetRequest,
    md: tuple[tuple[str, str], ...],
    concurrency: int,
    seconds: float,
) -> float:
    """Seconds per call (wall time / calls) with `concurrency` tasks for `seconds`."""
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await stub.Get(request, metadata=md)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - start) / count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: a few seconds")
    args = p.parse_args(argv)
    n, rounds, seconds = (2_000, 2, 0.3) if args.quick else (50_000, 15, 0.4)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wrap = asyncio.run(bench_wrap(work, n))
        gateways = asyncio.run(bench_gateways(work, rounds, seconds))
    bare = wrap["bare handler"]
    print("(a) the wrap around a trivial handler, time per call (best of 3)")
    print(
        render_table(
            ["case", "us per call", "vs bare"],
            [[k, f"{v * 1e6:.2f}", f"{v / bare:.2f}x"] for k, v in wrap.items()],
            right="lrr",
        )
    )
    print(
        f"\n(b) L1-hit Get through a gateway, medians of {rounds} rounds of {seconds:g} s "
        "(ratio: the median of the rounds' ratios)"
    )
    rows, measured = [], {}
    for concurrency in (1, 16):
        offs = gateways[f"without auth, concurrency {concurrency}"]
        ons = gateways[f"with auth, concurrency {concurrency}"]
        ratio = statistics.median(on / off for on, off in zip(ons, offs, strict=True))
        off, on = statistics.median(offs), statistics.median(ons)
        rows.append([str(concurrency), f"{off * 1e6:.1f}", f"{on * 1e6:.1f}", f"{ratio:.3f}x"])
        measured[f"L1-hit Get, concurrency {concurrency}"] = ratio
    extra = wrap["wrap, static token"] - bare
    get_time = statistics.median(gateways["without auth, concurrency 1"])
    measured["token check on the hit path"] = 100 * extra / get_time
    print(render_table(["concurrency", "us/call without", "us/call with", "ratio"], rows, "rrrr"))
    print()
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
