"""How the clients' channel behaves: retries, keepalive, and Subscribe streams that resume.

**Retries** are gRPC's own (the channel's service config, gRFC A6), for the calls that
can be repeated without changing the outcome: reads (Get, Ttl, Stats) and the removals
(Delete, DeleteMany, Invalidate, ReleaseLease: removing twice removes once). Not
GetMany: it fails whole when one of its keys' Redis node is down, and resending it all
would fail the same way until the node is back; the asyncio client's auto-batching asks
such a batch's keys one by one instead (_batcher.py).
They are sent again only on UNAVAILABLE, which the gateway answers when the call did not
run (its circuit breaker refused it, Redis could not be reached, the gateway is draining)
or when nothing reached the gateway (no connection), with exponential backoff, within
the call's deadline, and throttled: once retries fail much more than calls succeed, the
channel stops retrying until calls succeed again (``retryThrottling``), so a fleet of
clients does not multiply the load on a struggling gateway. Set, SetMany, Incr, Touch,
Warmup and Allow are never retried by the channel: each repeat would write (or count)
again, and a Set whose reply was lost may have been applied.

**Keepalive**: the client pings an idle connection every 30 s and drops it when a ping
goes unanswered for 10 s, so a silently dead gateway (a host gone, a partition) is
noticed by a channel with no calls in flight too — most of all a Subscribe stream, which
would otherwise wait forever. The gateway accepts pings that often
(``server.keepalive_*`` in docs/config.md).

**Subscribe resumes**: `Resumption` is the loop both clients run around a Subscribe
stream: a stream that ends (a gateway draining or restarting) or fails with UNAVAILABLE
is opened again with backoff, with `since` = the last event id delivered, or the
position the gateway gave when the stream opened (`cachegw-position`), so nothing is
missed: what the gateway can no longer replay it answers with RESET. Only when no
position is known at all does the client itself hand the caller a RESET.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from cachegw.models import Event, EventKind

SERVICE = "cachegw.v1.CacheService"
# Calls that may be sent again (see the module's docstring).
RETRIED_METHODS = (
    "Get",
    "Ttl",
    "Stats",
    "Delete",
    "DeleteMany",
    "Invalidate",
    "ReleaseLease",
)
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 3,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Retries stop while fewer than half of the 10 tokens remain: each failure takes one, each
# success gives back 0.1.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

POSITION_KEY = "cachegw-position"
RESUMED_ON = frozenset({grpc.StatusCode.UNAVAILABLE})
RESUME_FIRST_DELAY = 0.05  # seconds; doubled after each failed attempt, full jitter
RESUME_MAX_DELAY = 2.0


def service_config() -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
                    "retryPolicy": RETRY_POLICY,
                }
            ],
            "retryThrottling": RETRY_THROTTLING,
        }
    )


def channel_options(
    extra: Sequence[tuple[str, Any]] = (), *, retries: bool = True
) -> list[tuple[str, Any]]:
    """The clients' channel options; `extra` (the caller's) override them by name."""
    options: dict[str, Any] = {
        "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.enable_retries": int(retries),
    }
    if retries:
        options["grpc.service_config"] = service_config()
    options.update(dict(extra))
    return list(options.items())


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class Resumption:
    """The state of one resuming Subscribe: where to resume, and how long to wait."""

    __slots__ = ("_delay", "_rand", "established", "position", "resume")

    def __init__(
        self, since: str, *, resume: bool, rand: Callable[[], float] = random.random
    ) -> None:
        self.position = since
        self.resume = resume
        self.established = False  # a stream was open once: events may be missed from now
        self._delay = RESUME_FIRST_DELAY
        self._rand = rand

    def opened(self, metadata: Iterable[tuple[str, Any]] | None) -> Event | None:
        """The stream is registered. Returns a RESET for the caller when a previous
        stream was lost and no position says where to resume (events may be missed)."""
        lost_track = self.established and not self.position
        self.established = True
        self._delay = RESUME_FIRST_DELAY
        if not self.position:
            self.position = metadata_value(metadata, POSITION_KEY)
        if lost_track:
            return Event(id="", kind=EventKind.RESET, origin="client")
        return None

    def delivered(self, event: Event) -> None:
        if event.id:
            self.position = event.id

    def should_resume(self, error: grpc.RpcError | None) -> bool:
        """After the stream ended (`error` None) or failed: open it again?"""
        if not self.resume:
            return False
        return error is None or error.code() in RESUMED_ON

    def pause(self) -> float:
        """Seconds to wait before the next attempt (full jitter, capped)."""
        delay = self._delay * self._rand()
        self._delay = min(self._delay * 2, RESUME_MAX_DELAY)
        return delay
