"""The live fuzz harness: raw request bytes to every CacheService RPC of a served gateway,
through a generic channel (identity serializers, so even bytes that are no message at
all reach the gateway's own parser), and the statuses each RPC may answer.

Every call takes `metadata` (e.g. an ``authorization`` bearer token, once tokens are
required): `FuzzClient(channel, metadata=...)` adds it to each call it makes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw.v1 import cache_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CacheService"]
METHODS = {m.name: m for m in SERVICE.methods}
Metadata = Sequence[tuple[str, str | bytes]]
_identity = None  # no serializer: the call carries and returns raw bytes

C = grpc.StatusCode
# docs/errors.md and the head of cache.proto: what any RPC may answer for its input
# alone, with Redis up, no origin, and a client that neither times out nor cancels.
# UNAVAILABLE (Redis cannot serve), DEADLINE_EXCEEDED and the origin statuses need a
# failure the fuzz run does not cause, so a fuzz run that sees them found a bug (e.g.
# input that made Redis answer an error).
_COMMON = frozenset({C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED})
DOCUMENTED: dict[str, frozenset[grpc.StatusCode]] = {name: _COMMON for name in METHODS}
DOCUMENTED["Incr"] = _COMMON | {C.OUT_OF_RANGE, C.FAILED_PRECONDITION}
# Subscribe streams: a caller that cancels its stream sees CANCELLED (its own doing).
DOCUMENTED["Subscribe"] = _COMMON | {C.CANCELLED}
# Whatever the state, never these: an unmapped exception (UNKNOWN) or a gateway bug.
NEVER = frozenset({C.UNKNOWN, C.INTERNAL, C.DATA_LOSS})


@dataclass
class Outcome:
    method: str
    request: bytes
    code: grpc.StatusCode
    details: str


@dataclass
class FuzzClient:
    """Sends raw request bytes; records every outcome (`seen`: counts by method, status)."""

    channel: grpc.Channel
    metadata: Metadata = ()
    timeout: float = 10.0
    seen: Counter[tuple[str, grpc.StatusCode]] = field(default_factory=Counter)
    unexpected: list[Outcome] = field(default_factory=list)
    # Statuses documented for this client's setting beyond DOCUMENTED (e.g. a token
    # limited to key prefixes: PERMISSION_DENIED).
    also: frozenset[grpc.StatusCode] = frozenset()
    _lock: threading.Lock = field(default_factory=threading.Lock)  # calls from threads

    def documented(self, method: str) -> frozenset[grpc.StatusCode]:
        return DOCUMENTED[method] | self.also

    def _path(self, method: str) -> str:
        return f"/{SERVICE.full_name}/{method}"

    def _record(self, method: str, request: bytes, code: grpc.StatusCode, details: str) -> Outcome:
        out = Outcome(method, request, code, details)
        with self._lock:
            self.seen[method, code] += 1
            if code not in self.documented(method):
                self.unexpected.append(out)
        return out

    def unary(self, method: str, request: bytes) -> Outcome:
        """One unary call with `request` as its exact wire bytes."""
        call = self.channel.unary_unary(self._path(method), _identity, _identity)
        try:
            call(request, timeout=self.timeout, metadata=tuple(self.metadata))
        except grpc.RpcError as err:
            return self._record(method, request, err.code(), err.details() or "")
        return self._record(method, request, C.OK, "")

    def subscribe(self, request: bytes, events: int, after_s: float) -> Outcome:
        """A Subscribe stream, cancelled after `events` events or `after_s` seconds,
        whichever comes first; its final status (CANCELLED when we ended it)."""
        call = self.channel.unary_stream(self._path("Subscribe"), _identity, _identity)(
            request, timeout=self.timeout, metadata=tuple(self.metadata)
        )
        timer = threading.Timer(after_s, call.cancel)
        timer.start()
        try:
            for got, _ in enumerate(call, start=1):
                if got >= events:
                    call.cancel()  # type: ignore[no-untyped-call]
                    break
        except grpc.RpcError:
            pass
        finally:
            timer.cancel()
        # After cancel(), the iterator may have ended without raising: ask the call.
        deadline = time.monotonic() + self.timeout
        while call.code() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        code = call.code()
        details = call.details() or ""
        return self._record("Subscribe", request, code, details)

    def call(
        self, method: str, request: bytes, *, events: int = 1, after_s: float = 0.05
    ) -> Outcome:
        if METHODS[method].server_streaming:
            return self.subscribe(request, events, after_s)
        return self.unary(method, request)

    # -- health ---------------------------------------------------------------------------

    def serving(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=SERVICE.full_name),
            timeout=self.timeout,
            metadata=tuple(self.metadata),
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def round_trip(self, key: str, value: bytes) -> bytes:
        """A plain Set then Get of `key`: the value read back."""
        md = tuple(self.metadata)
        set_call = self.channel.unary_unary(
            self._path("Set"), pb.SetRequest.SerializeToString, pb.SetResponse.FromString
        )
        stored = set_call(pb.SetRequest(key=key, value=value), timeout=self.timeout, metadata=md)
        assert stored.outcome == pb.SET_OUTCOME_STORED, stored
        get_call = self.channel.unary_unary(
            self._path("Get"), pb.GetRequest.SerializeToString, pb.GetResponse.FromString
        )
        got = get_call(pb.GetRequest(key=key), timeout=self.timeout, metadata=md)
        assert got.status == pb.STATUS_HIT, got
        return bytes(got.value)

    def report(self) -> str:
        lines = [f"{m} {c.name}: {n}" for (m, c), n in sorted(self.seen.items(), key=str)]
        bad = [
            f"{o.method} -> {o.code.name} {o.details!r} for {o.request!r}" for o in self.unexpected
        ]
        return "\n".join([*lines, "unexpected:", *bad[:20]])
