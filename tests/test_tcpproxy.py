"""The test proxy itself: each mode does what the partition tests rely on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cachegw_gateway.managed_redis import ManagedRedis
from tests.tcpproxy import TcpProxy


@pytest.fixture
def proxy(redis_server: ManagedRedis) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.host, redis_server.port) as p:
        yield p


def _client(proxy: TcpProxy, timeout: float = 0.5) -> redis.Redis:
    return redis.Redis.from_url(
        proxy.url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def test_pass_forwards_both_ways(proxy: TcpProxy) -> None:
    with _client(proxy) as client:
        client.set("k", b"v")
        assert client.get("k") == b"v"
    assert proxy.accepted >= 1


def test_reset_cuts_open_connections_and_refuses_new_ones(proxy: TcpProxy) -> None:
    with _client(proxy) as client:
        assert client.ping()
        proxy.set_mode("reset")
        assert proxy.resets >= 1
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the pooled connection was reset
        with pytest.raises(redis.ConnectionError) as refused:
            client.ping()  # a new one is refused
        assert "refused" in str(refused.value).lower()
        assert time.monotonic() - started < 0.5 * 2  # fails at once, not by timeout

        proxy.set_mode("pass")  # listens again on the same port
        assert client.ping()


def test_blackhole_is_silent_until_the_client_gives_up(proxy: TcpProxy) -> None:
    with _client(proxy, timeout=0.3) as client:
        assert client.ping()
        proxy.set_mode("blackhole")
        for _ in range(2):  # the open connection, then a new one: both silent
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                client.ping()
            assert time.monotonic() - started >= 0.25
        assert proxy.dropped_bytes > 0

        proxy.set_mode("pass")
        assert client.ping()  # the timed-out connections were dropped; a new one passes


def test_bad_mode_and_non_loopback_are_refused(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        proxy.set_mode("drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy("10.0.0.1", 6379)
