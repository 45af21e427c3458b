"""The per-gateway lease bookkeeping on its own: shared wake-ups, the poll backoff, no leaks."""

from __future__ import annotations

import asyncio
import time

from cachegw_gateway.leases import POLL_FIRST, TOKEN_SIZE, LeaseTable, LeaseToken


async def test_waiters_of_a_key_wake_together_and_leave_nothing_behind() -> None:
    table = LeaseTable(time.monotonic)
    waiters = [asyncio.ensure_future(table.wait("k", 5)) for _ in range(10)]
    other = asyncio.ensure_future(table.wait("other", 0.01))
    await asyncio.sleep(0.01)
    table.wake("k")
    assert await asyncio.gather(*waiters) == [True] * 10
    assert isinstance(await other, bool)  # woken by its tick, or timed out
    assert len(table) == 0


async def test_the_safety_poll_backs_off_while_nothing_happens() -> None:
    table = LeaseTable(time.monotonic)
    ticks = 0
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:  # bounded by the deadline
        if await table.wait("k", deadline - time.monotonic()):
            ticks += 1
    # 50 ms doubling: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 = 1.55 s -> 5 ticks, not 1.6 / 0.05 = 32.
    assert 4 <= ticks <= 6, ticks
    assert len(table) == 0
    # After a quiet spell the next wait polls fast again.
    await asyncio.sleep(2.1)
    started = time.monotonic()
    assert await table.wait("k", 1.0)
    assert time.monotonic() - started < POLL_FIRST * 3


async def test_attempts_and_held_leases() -> None:
    table = LeaseTable(time.monotonic)
    table.begin_attempt("k")
    waiter = asyncio.ensure_future(table.wait("k", 5))
    await asyncio.sleep(0)
    table.end_attempt("k")  # the attempt's outcome wakes whoever waits on it
    assert await asyncio.wait_for(waiter, 1)
    table.note_held("k", 0.05)
    assert table.held("k")
    await asyncio.sleep(0.06)
    assert not table.held("k")


def test_tokens_round_trip_and_reject_foreign_bytes() -> None:
    token = LeaseToken.new(granted_ms=1234, generation=7)
    assert len(token.raw) == TOKEN_SIZE
    assert LeaseToken.parse(token.raw) == token
    assert LeaseToken.new(1234, 7).raw != token.raw  # random part
    for bad in (b"", b"x" * (TOKEN_SIZE - 1), b"x" * (TOKEN_SIZE + 1)):
        try:
            LeaseToken.parse(bad)
        except ValueError as exc:
            assert "not a token this gateway issued" in str(exc)
        else:
            raise AssertionError(f"{bad!r} parsed")
