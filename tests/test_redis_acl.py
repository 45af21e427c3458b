"""A Redis ACL user with only what the gateway needs (the rules docs/config.md gives):
every RPC works, Redis denies nothing, and a missing permission is named."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayFactory
from tests.redis_exercise import every_rpc

DOCS = Path(__file__).parent.parent / "docs" / "config.md"
PASSWORD = "acl-Pa55word"


def documented_rules() -> list[str]:
    """The ACL SETUSER rules in docs/config.md (the block after 'ACL SETUSER cachegw')."""
    text = DOCS.read_text()
    block = text.split("ACL SETUSER cachegw on", 1)[1].split("```", 1)[0]
    rules = [r for r in re.split(r"[\s\\]+", block) if r]
    assert rules[0].startswith(">"), "the block starts with the password rule"
    return rules[1:]


def deny_log(client: Any) -> list[tuple[str, str]]:
    out = []
    for entry in client.execute_command("ACL", "LOG", "128"):
        d = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        reason, obj = d["reason"], d["object"]
        out.append(
            (
                reason.decode() if isinstance(reason, bytes) else str(reason),
                obj.decode() if isinstance(obj, bytes) else str(obj),
            )
        )
    return out


@pytest.fixture
def admin(redis_server: ManagedRedis) -> Iterator[redis.Redis]:
    with redis.Redis(port=redis_server.port) as client:
        yield client


def _user(admin: Any, rules: list[str]) -> None:
    admin.execute_command("ACL", "SETUSER", "cachegw", "reset", "on", f">{PASSWORD}", *rules)
    admin.execute_command("ACL", "LOG", "RESET")


async def test_the_documented_rules_are_enough(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis, admin: redis.Redis
) -> None:
    _user(admin, documented_rules())
    url = f"redis://cachegw:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    gw = await gateway_factory(redis_url=url)
    await every_rpc(gw.stub)
    assert await gw.server.store.ping()
    assert deny_log(admin) == []


async def test_the_rules_keep_the_user_in_its_prefix(
    redis_server: ManagedRedis, admin: redis.Redis
) -> None:
    _user(admin, documented_rules())
    with redis.Redis(port=redis_server.port, username="cachegw", password=PASSWORD) as user:
        user.set("cg:{x}", b"1")
        denials: tuple[Any, ...] = (
            lambda: user.get("other:key"),
            lambda: user.flushall(),
            lambda: user.config_get("*"),
            lambda: user.keys("*"),
            lambda: user.publish("other-channel", b"x"),
        )
        for denied in denials:
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()


async def test_a_missing_permission_is_named(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis, admin: redis.Redis
) -> None:
    _user(admin, [*documented_rules(), "-xadd"])
    url = f"redis://cachegw:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    gw = await gateway_factory(redis_url=url)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Invalidate(pb.InvalidateRequest(keys=["k"]), timeout=5)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # Denied inside a Lua script: Redis answers ERR without the command's name (ACL LOG
    # has it); the gateway still gives the NOPERM advice and counts it as NOPERM.
    assert "lacks a permission" in details and "ACL SETUSER" in details
    assert "ACL LOG" in details
    assert gw.server.stats.error_replies.get("NOPERM") == 1
    assert ("command", "xadd") in deny_log(admin)
    assert PASSWORD not in details
