"""The circuit breaker's state machine (breaker.py) on a hand-driven clock: which
failures count, when it opens, the half-open probe, and what it shows in GatewayStats.
What Redis does is tested with a real Redis in test_breaker.py; here the failures are the
gateway's own exception types, built the way `redis_errors.classify` builds them."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachegw_gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerOpen, counts
from cachegw_gateway.config import BreakerConfig
from cachegw_gateway.redis_errors import L2Unavailable, classify
from cachegw_gateway.stats import GatewayStats

TIMEOUT = classify(RedisTimeoutError("Timeout reading from socket"))
REFUSED = classify(RedisConnectionError("Error 111 connecting"), write=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**settings: object) -> tuple[Breaker, Clock, GatewayStats]:
    clock, stats = Clock(), GatewayStats()
    config = BreakerConfig(**settings)  # type: ignore[arg-type]
    return Breaker(config, stats, clock=clock), clock, stats


def call(breaker: Breaker, err: L2Unavailable | None = None) -> None:
    breaker.done(breaker.admit(), err)


def test_which_failures_count() -> None:
    assert counts(TIMEOUT) and counts(REFUSED)
    for text in ("LOADING Redis is loading", "BUSY Redis is busy", "MASTERDOWN Link down"):
        assert counts(classify(ResponseError(text))), text
    # Answers from a reachable Redis: reads still work, or the message says more.
    assert not counts(classify(ReadOnlyError("You can't write against a read only replica.")))
    for text in ("OOM command not allowed", "NOSCRIPT No matching script", "ERR wrong"):
        assert not counts(classify(ResponseError(text))), text


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    breaker, _, stats = make(failures=3, failure_rate=0)
    assert stats.breaker_state == CLOSED
    for _ in range(2):
        call(breaker, TIMEOUT)
    call(breaker)  # an answer in between: the count starts over
    call(breaker, TIMEOUT)
    call(breaker, TIMEOUT)
    assert breaker.state == CLOSED
    call(breaker, REFUSED)
    assert breaker.state == OPEN
    assert (stats.breaker_state, stats.breaker_trips) == (OPEN, 1)
    assert "3 consecutive failures" in breaker.reason


def test_error_replies_that_are_answers_never_open_it() -> None:
    breaker, _, _ = make(failures=2, failure_rate=0.1, min_calls=2)
    oom = classify(ResponseError("OOM command not allowed when used memory > 'maxmemory'"))
    readonly = classify(ReadOnlyError("You can't write against a read only replica."))
    for _ in range(20):
        call(breaker, oom)
        call(breaker, readonly)
    assert breaker.state == CLOSED


def test_the_failure_rate_opens_it_once_the_window_holds_min_calls() -> None:
    breaker, _, _ = make(failures=0, failure_rate=0.5, window_seconds=10, min_calls=6)
    for _ in range(2):  # alternating: never two failures in a row
        call(breaker)
        call(breaker, TIMEOUT)
    call(breaker)
    assert breaker.state == CLOSED  # 2 of 5: too few calls, and under the rate
    call(breaker, TIMEOUT)
    assert breaker.state == OPEN  # 3 of 6
    assert "3 of the last 6 calls failed" in breaker.reason


def test_the_failure_rate_forgets_calls_older_than_the_window() -> None:
    breaker, clock, _ = make(failures=0, failure_rate=0.5, window_seconds=10, min_calls=4)
    for _ in range(3):
        call(breaker, TIMEOUT)
    clock.now += 11  # those three left the window
    call(breaker)
    call(breaker)
    call(breaker)
    call(breaker, TIMEOUT)
    assert breaker.state == CLOSED  # 1 of 4 within the window (4 of 7 counting the old)
    call(breaker, TIMEOUT)
    assert breaker.state == CLOSED  # 2 of 5
    call(breaker, TIMEOUT)
    assert breaker.state == OPEN  # 3 of 6


def test_while_open_calls_are_refused_without_being_sent() -> None:
    breaker, clock, stats = make(failures=1, cooldown_seconds=5)
    call(breaker, TIMEOUT)
    for _ in range(3):
        with pytest.raises(BreakerOpen) as err:
            breaker.admit()
        assert isinstance(err.value, L2Unavailable)
        assert "circuit breaker is open" in str(err.value)
        assert "was not sent to redis and not applied" in str(err.value)
        assert "1 consecutive failures" in str(err.value)
    assert stats.breaker_refused == 3
    clock.now += 4.9
    with pytest.raises(BreakerOpen):
        breaker.admit()


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker, clock, stats = make(failures=1, cooldown_seconds=5)
    caplog.set_level(logging.INFO, logger="cachegw.redis")
    call(breaker, TIMEOUT)
    clock.now += 5
    probe = breaker.admit()
    assert breaker.state == HALF_OPEN == stats.breaker_state
    with pytest.raises(BreakerOpen) as err:  # only one probe at a time
        breaker.admit()
    assert "a probe call is in flight" in str(err.value)
    breaker.done(probe, None)
    assert breaker.state == CLOSED == stats.breaker_state
    call(breaker)
    transitions = [r.getMessage().split(":")[0] for r in caplog.records]
    assert transitions == [
        "redis circuit breaker closed -> open",
        "redis circuit breaker open -> half-open",
        "redis circuit breaker half-open -> closed",
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    breaker, clock, stats = make(failures=1, cooldown_seconds=5)
    call(breaker, TIMEOUT)
    clock.now += 5
    breaker.done(breaker.admit(), REFUSED)
    assert breaker.state == OPEN
    assert stats.breaker_trips == 2
    assert "the half-open probe failed" in breaker.reason
    clock.now += 4
    with pytest.raises(BreakerOpen):
        breaker.admit()
    clock.now += 1
    breaker.done(breaker.admit(), None)
    assert breaker.state == CLOSED


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    breaker, clock, _ = make(failures=1, cooldown_seconds=1)
    call(breaker, TIMEOUT)
    clock.now += 1
    breaker.cancelled(breaker.admit())
    assert breaker.state == HALF_OPEN
    breaker.done(breaker.admit(), None)
    assert breaker.state == CLOSED


def test_calls_admitted_before_a_change_do_not_decide_the_next_state() -> None:
    breaker, clock, _ = make(failures=2, cooldown_seconds=1)
    stuck = [breaker.admit() for _ in range(5)]  # sent before Redis hung
    breaker.done(stuck[0], TIMEOUT)
    breaker.done(stuck[1], TIMEOUT)
    assert breaker.state == OPEN
    clock.now += 1
    probe = breaker.admit()
    breaker.done(stuck[2], None)  # an old call's late answer is not the probe's
    breaker.done(stuck[3], TIMEOUT)  # nor is an old call's late failure
    assert breaker.state == HALF_OPEN
    breaker.done(probe, None)
    assert breaker.state == CLOSED
    breaker.done(stuck[4], TIMEOUT)
    call(breaker, TIMEOUT)
    assert breaker.state == CLOSED  # one failure counted since it closed


def test_the_health_probe_decides_only_after_the_cooldown() -> None:
    breaker, clock, _ = make(failures=1, cooldown_seconds=5)
    assert not breaker.probe_due()  # closed: the probe's PING is not a verdict
    call(breaker, TIMEOUT)
    assert not breaker.probe_due()
    clock.now += 5
    assert breaker.probe_due()
    breaker.probed(REFUSED)
    assert breaker.state == OPEN
    assert not breaker.probe_due()
    clock.now += 5
    assert breaker.probe_due()
    # A READONLY answer: Redis is reachable (reads work), the breaker closes.
    breaker.probed(classify(ReadOnlyError("You can't write against a read only replica.")))
    assert breaker.state == CLOSED


def test_the_subscription_coming_back_closes_it_at_once() -> None:
    """After a failover the bus is live on the new primary before the cool-down ends:
    the breaker must not go on refusing reads (the outage copies end with the bus)."""
    breaker, clock, stats = make(failures=2, failure_rate=0, cooldown_seconds=5)
    call(breaker, TIMEOUT)
    call(breaker, TIMEOUT)
    assert breaker.state == OPEN
    clock.now += 1  # well inside the cool-down
    breaker.heard_from_redis("the invalidation subscription is live again")
    assert breaker.state == CLOSED and stats.breaker_state == CLOSED
    call(breaker)  # admitted
    breaker.heard_from_redis("again")  # closed: nothing changes
    assert breaker.state == CLOSED
