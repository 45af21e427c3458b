"""get_or_load's protocol (cachegw._protocol) driven by hand, step by step: no gateway, no
thread, no event loop. What each client does with a step is tested elsewhere; here, what
the protocol asks for, and what it makes of each answer and each failure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cachegw import _protocol
from cachegw._protocol import InBackground, Load, Rpc, Step, Steps
from cachegw.errors import InvalidArgument, Unavailable
from cachegw.models import Entry, SetOutcome, SetResult, Status, Tier
from cachegw.near import NearCache
from cachegw.v1 import cache_pb2 as pb

TOKEN = b"t" * 28


def loader() -> bytes:
    return b"new"


def start(near: NearCache | None = None, *, allow_stale: bool = True) -> Steps[bytes]:
    return _protocol.get_or_load(
        near,
        "k",
        loader,
        ttl=None,
        tags=["tag"],
        max_wait=None,
        allow_stale=allow_stale,
        timeout=1.0,
    )


def finished(steps: Steps[Any], reply: object = None) -> object:
    """What the protocol returns once sent `reply`, asserting that it asks nothing more."""
    with pytest.raises(StopIteration) as done:
        steps.send(reply)
    return done.value.value


def rpc(step: Step, method: str) -> Rpc:
    assert isinstance(step, Rpc), step
    assert step.method == method
    return step


def hit(*, refresh: bool, status: Status = Status.HIT, ttl: float = 30.0) -> Entry:
    return Entry(
        status,
        b"old",
        Tier.L2,
        lease_token=TOKEN if refresh else b"",
        refresh=refresh,
        ttl_remaining=ttl,
    )


LEASED = Entry(Status.LEASED, None, Tier.ORIGIN, lease_token=TOKEN)
STORED = SetResult(SetOutcome.STORED, 2, 30.0, "default")


def loading() -> Steps[bytes]:
    """A run that was handed the lease and now asks for the loader to be called."""
    steps = start()
    next(steps)
    assert isinstance(steps.send(LEASED), Load)
    return steps


def test_a_lease_is_filled_with_its_token() -> None:
    steps = start()
    get = rpc(next(steps), "Get")
    assert (get.call.request.lease, get.call.request.allow_stale, get.timeout) == (True, True, 1.0)
    assert isinstance(steps.send(LEASED), Load)
    set_ = rpc(steps.send(b"new"), "Set")
    assert (set_.call.request.value, set_.call.request.lease_token) == (b"new", TOKEN)
    assert list(set_.call.request.tags) == ["tag"]
    assert finished(steps, STORED) == b"new"


def test_a_failing_loader_releases_the_lease_and_raises() -> None:
    steps = loading()
    release = rpc(steps.throw(RuntimeError("source down")), "ReleaseLease")
    assert release.shield
    assert isinstance(release.call.request, pb.ReleaseLeaseRequest)
    assert (release.call.request.key, release.call.request.lease_token) == ("k", TOKEN)
    with pytest.raises(RuntimeError, match="source down"):
        steps.send(True)


def test_a_cancelled_caller_releases_the_lease_and_stays_cancelled() -> None:
    steps = loading()
    rpc(steps.throw(asyncio.CancelledError()), "ReleaseLease")
    # The release itself failing is logged; the cancellation still propagates.
    with pytest.raises(asyncio.CancelledError):
        steps.throw(Unavailable("gateway gone"))


def test_a_set_that_fails_releases_the_lease_and_returns_the_value() -> None:
    steps = loading()
    rpc(steps.send(b"new"), "Set")
    rpc(steps.throw(Unavailable("redis down")), "ReleaseLease")
    assert finished(steps, True) == b"new"


def test_a_refused_fill_needs_no_release() -> None:
    steps = loading()
    rpc(steps.send(b"new"), "Set")
    refused = SetResult(SetOutcome.LEASE_INVALID, 0, 0.0, "default")
    assert finished(steps, refused) == b"new"


def test_a_failing_refresh_releases_and_never_touches_the_value() -> None:
    near = NearCache(ttl=30)
    near.go_live()
    steps = start(near)
    next(steps)
    background = steps.send(hit(refresh=True))
    assert isinstance(background, InBackground)
    assert background.name == "cachegw-refresh-k"
    assert finished(steps) == b"old"  # the caller has the value at once
    assert near.get("k") == b"old"

    refresh = background.steps
    assert isinstance(next(refresh), Load)
    release = rpc(refresh.throw(RuntimeError("source down")), "ReleaseLease")
    assert release.call.request.lease_token == TOKEN
    assert finished(refresh, True) is None  # logged, not raised
    assert near.get("k") == b"old"


def test_a_stale_value_is_served_while_one_caller_refreshes() -> None:
    steps = start()
    next(steps)
    background = steps.send(hit(refresh=True, status=Status.STALE, ttl=0))
    assert isinstance(background, InBackground)
    assert finished(steps) == b"old"
    refresh = background.steps
    next(refresh)
    rpc(refresh.send("newer"), "Set")
    assert finished(refresh, STORED) is None


def test_a_hit_without_refresh_and_a_near_hit() -> None:
    near = NearCache(ttl=30)
    near.go_live()
    steps = start(near)
    next(steps)
    assert finished(steps, hit(refresh=False)) == b"old"
    assert finished(start(near)) == b"old"  # from the near cache: no step at all


@pytest.mark.parametrize("answer", ["miss", "unreachable"])
def test_without_a_lease_the_loader_runs_and_nothing_is_stored(answer: str) -> None:
    steps = start()
    next(steps)
    if answer == "miss":
        load = steps.send(Entry(Status.MISS, None, Tier.ORIGIN))
    else:
        load = steps.throw(Unavailable("no gateway"))
    assert isinstance(load, Load)
    assert finished(steps, "text") == b"text"


def test_other_gateway_errors_are_raised() -> None:
    steps = start()
    next(steps)
    with pytest.raises(InvalidArgument):
        steps.throw(InvalidArgument("key too long"))


def test_a_loader_returning_garbage_releases_the_lease() -> None:
    steps = loading()
    rpc(steps.send(42), "ReleaseLease")
    with pytest.raises(TypeError, match="bytes or str, not int"):
        steps.send(True)


def test_closing_a_run_mid_load_asks_for_nothing_more() -> None:
    steps = loading()
    steps.close()  # GeneratorExit at the Load: no release step may be yielded


def test_near_cache_keeper() -> None:
    near = NearCache(ttl=30)
    keeper = _protocol.NearCacheKeeper(near)
    assert not near.live
    keeper.registered()
    assert near.live
    near.fill("a", hit(refresh=False), near.ticket())
    keeper.event(pb.InvalidationEvent(kind=pb.EVENT_KIND_KEYS, keys=["a"]))
    assert near.get("a") is None
    assert [keeper.ended() for _ in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert not near.live
    keeper.registered()  # a stream that registers resets the backoff
    assert keeper.ended() == 0.05
