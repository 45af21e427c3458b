"""A bounded fuzz run against a served gateway (`cachegw serve` on a real redis-server):
every RPC gets valid-but-edgy messages and mutated or random bytes; every answer must be
a status docs/errors.md gives that RPC (never UNKNOWN or INTERNAL), and the gateway must
be healthy afterwards: health SERVING, a Set/Get round trip, the same process, no
traceback in its log.

FUZZ_EXAMPLES=<n> runs n examples per RPC and kind (`make fuzz`); the default keeps the
module to seconds in `make test`. Examples are derandomized (a run is reproducible)
unless FUZZ_RANDOM=1.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayProcess
from tests.fuzz.conftest import MAX_KEY_BYTES, examples
from tests.fuzz.harness import METHODS, NEVER, FuzzClient
from tests.fuzz.strategies import edgy_text, messages, wire_inputs

LIVE = settings(
    max_examples=examples(12),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ALL = sorted(METHODS)
# Fields that mostly need a known value to get past validation, and their edges.
OVERRIDES = {
    "classes": st.one_of(
        st.sampled_from(["default", "limited", "window"]), edgy_text(MAX_KEY_BYTES)
    ),
    "since": st.sampled_from(
        [
            "0-0",
            "0-1",
            "1-0",
            "18446744073709551615-18446744073709551615",
            "9" * 20 + "-" + "9" * 20,
            "-",
            "1",
            "x",
        ]
    ),
    "resume": st.one_of(st.just(""), edgy_text(MAX_KEY_BYTES)),
    # Tokens of the right size (forged), and of any size.
    "lease_token": st.one_of(st.binary(min_size=28, max_size=28), st.binary(max_size=40)),
    "key": st.one_of(
        edgy_text(MAX_KEY_BYTES), st.sampled_from(["rl:a", "win:a", "rl:{}", "win:*"])
    ),
}


def request_class(method: str) -> type[Message]:
    return GetMessageClass(METHODS[method].input_type)


def _check(client: FuzzClient, method: str, request: bytes, events: int, after_s: float) -> None:
    if method == "Subscribe":
        # An event for the stream to carry while it is open (cancelled at random points).
        poke = pb.InvalidateRequest(keys=["fuzz:poke"]).SerializeToString()
        timer = threading.Timer(after_s / 2, client.unary, ("Invalidate", poke))
        timer.start()
        try:
            out = client.call(method, request, events=events, after_s=after_s)
        finally:
            timer.join()
    else:
        out = client.call(method, request)
    assert out.code not in NEVER, (out.code, out.details, request)
    assert out.code in client.documented(method), (out.code, out.details, request)


@pytest.mark.parametrize("method", ALL)
@LIVE
@given(data=st.data())
def test_edgy_messages(fuzz_client: FuzzClient, method: str, data: st.DataObject) -> None:
    msg = data.draw(
        messages(request_class(method), MAX_KEY_BYTES, overrides=OVERRIDES), label="request"
    )
    events = data.draw(st.integers(1, 3), label="events")
    after_s = data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.1]), label="after_s")
    _check(fuzz_client, method, msg.SerializeToString(), events, after_s)


@pytest.mark.parametrize("method", ALL)
@LIVE
@given(data=st.data())
def test_mutated_and_random_bytes(
    fuzz_client: FuzzClient, method: str, data: st.DataObject
) -> None:
    raw = data.draw(wire_inputs(request_class(method), MAX_KEY_BYTES, OVERRIDES), label="bytes")
    events = data.draw(st.integers(1, 3), label="events")
    after_s = data.draw(st.sampled_from([0.0, 0.01, 0.05]), label="after_s")
    _check(fuzz_client, method, raw, events, after_s)


@LIVE
@given(data=st.data())
def test_concurrent_bursts(fuzz_client: FuzzClient, data: st.DataObject) -> None:
    """Up to 24 calls of any RPCs at once (Subscribe streams cancelled among them)."""
    burst = data.draw(
        st.lists(
            st.sampled_from(ALL).flatmap(
                lambda m: st.tuples(
                    st.just(m), wire_inputs(request_class(m), MAX_KEY_BYTES, OVERRIDES)
                )
            ),
            min_size=2,
            max_size=24,
        ),
        label="burst",
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(lambda c: fuzz_client.call(c[0], c[1], events=2, after_s=0.05), burst))
    for out in outs:
        assert out.code in fuzz_client.documented(out.method), (
            out.method,
            out.code,
            out.details,
            out.request,
        )


def test_gateway_healthy_afterwards(fuzz_client: FuzzClient, fuzz_gateway: GatewayProcess) -> None:
    """Runs after the fuzzing above (same module, same gateway process)."""
    assert fuzz_gateway.proc.poll() is None, fuzz_gateway.output()
    assert fuzz_client.serving()
    for key in ("after-fuzz", "after{fuzz}*?", "after\x00fuzz"):
        assert fuzz_client.round_trip(key, b"still here") == b"still here"
    log = fuzz_gateway.output()
    assert "Traceback" not in log, log[-4000:]
    assert " ERROR " not in log, log[-4000:]
    assert not fuzz_client.unexpected, fuzz_client.report()
