"""The coalescer's contract, run over the compiled structure and its plain-Python model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol

import pytest

from cachegw_native.coalescer import Coalescer, LoadCancelledError
from tests.native.models import CoalescerModel


class AnyCoalescer(Protocol):
    coalesced: int
    flights: int

    def __len__(self) -> int: ...
    def forget(self, key: str) -> bool: ...
    def forget_all(self) -> int: ...
    def cancel_all(self) -> int: ...
    async def run(self, key: str, load: Callable[[], Awaitable[Any]]) -> Any: ...
    async def run_many(
        self, keys: Sequence[str], load_many: Callable[[list[str]], Awaitable[Sequence[Any]]]
    ) -> list[Any]: ...


@pytest.fixture(params=["native", "model"])
def co(request: pytest.FixtureRequest) -> AnyCoalescer:
    return Coalescer() if request.param == "native" else CoalescerModel()  # type: ignore[return-value]


class Gate:
    """A load the test releases by hand; counts how often it ran."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.error: BaseException | None = None

    async def one(self, key: str = "k") -> str:
        self.calls.append([key])
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"v:{key}"

    async def many(self, keys: list[str]) -> list[str]:
        self.calls.append(keys)
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [f"v:{k}" for k in keys]


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_concurrent_callers_share_one_load(co: AnyCoalescer) -> None:
    gate = Gate()
    tasks = [asyncio.create_task(co.run("k", gate.one)) for _ in range(10)]
    await settle()
    assert len(co) == 1
    gate.release.set()
    assert await asyncio.gather(*tasks) == ["v:k"] * 10
    assert len(gate.calls) == 1 and co.flights == 1 and co.coalesced == 9
    assert len(co) == 0


async def test_distinct_keys_do_not_share(co: AnyCoalescer) -> None:
    gate = Gate()
    gate.release.set()
    a, b = await asyncio.gather(
        co.run("a", lambda: gate.one("a")), co.run("b", lambda: gate.one("b"))
    )
    assert (a, b) == ("v:a", "v:b") and co.flights == 2 and len(co) == 0


async def test_exception_reaches_every_caller(co: AnyCoalescer) -> None:
    gate = Gate()
    gate.error = KeyError("origin down")
    tasks = [asyncio.create_task(co.run("k", gate.one)) for _ in range(4)]
    await settle()
    gate.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, KeyError) for r in results)
    assert len(gate.calls) == 1 and len(co) == 0


async def test_cancelled_leader_does_not_strand_waiters(co: AnyCoalescer) -> None:
    gate = Gate()
    leader = asyncio.create_task(co.run("k", gate.one))
    await settle()
    waiters = [asyncio.create_task(co.run("k", gate.one)) for _ in range(3)]
    await settle()
    leader.cancel()
    await settle()
    assert leader.cancelled() and len(co) == 1
    gate.release.set()
    assert await asyncio.gather(*waiters) == ["v:k"] * 3
    assert len(gate.calls) == 1 and len(co) == 0


async def test_load_outlives_callers_that_all_left(co: AnyCoalescer) -> None:
    gate = Gate()
    callers = [asyncio.create_task(co.run("k", gate.one)) for _ in range(2)]
    await settle()
    for t in callers:
        t.cancel()
    await settle()
    late = asyncio.create_task(co.run("k", gate.one))  # joins the orphaned flight
    await settle()
    gate.release.set()
    assert await late == "v:k" and len(gate.calls) == 1
    await settle()
    assert len(co) == 0
    assert await co.run("k", gate.one) == "v:k" and len(gate.calls) == 2


async def test_abandoned_failure_still_clears_the_table(co: AnyCoalescer) -> None:
    gate = Gate()
    gate.error = RuntimeError("nobody listens")
    caller = asyncio.create_task(co.run("k", gate.one))
    await settle()
    caller.cancel()
    gate.release.set()
    await settle()
    assert caller.cancelled() and len(co) == 0


async def test_cancel_all_fails_waiters_with_a_clear_error(co: AnyCoalescer) -> None:
    gate = Gate()
    tasks = [asyncio.create_task(co.run("k", gate.one)) for _ in range(3)]
    many = asyncio.create_task(co.run_many(["x", "y"], gate.many))
    await settle()
    assert co.cancel_all() == 3
    for t in [*tasks, many]:
        with pytest.raises(LoadCancelledError):
            await t
    assert len(co) == 0


async def test_run_many_joins_flights_and_loads_the_rest_once(co: AnyCoalescer) -> None:
    gate = Gate()
    single = asyncio.create_task(co.run("b", lambda: gate.one("b")))
    await settle()
    many = asyncio.create_task(co.run_many(["a", "b", "c", "a", "d"], gate.many))
    await settle()
    joiner = asyncio.create_task(co.run("c", lambda: gate.one("c")))  # joins the batch
    await settle()
    assert gate.calls == [["b"], ["a", "c", "d"]]
    assert len(co) == 4
    gate.release.set()
    assert await many == ["v:a", "v:b", "v:c", "v:a", "v:d"]
    assert await single == "v:b" and await joiner == "v:c"
    assert co.flights == 2 and co.coalesced == 2 and len(co) == 0


async def test_run_many_all_in_flight_starts_no_load(co: AnyCoalescer) -> None:
    gate = Gate()
    single = asyncio.create_task(co.run("a", lambda: gate.one("a")))
    await settle()
    many = asyncio.create_task(co.run_many(["a", "a"], gate.many))
    await settle()
    gate.release.set()
    assert await many == ["v:a", "v:a"] and await single == "v:a"
    assert gate.calls == [["a"]] and co.coalesced == 1 and len(co) == 0
    assert await co.run_many([], gate.many) == []


async def test_run_many_failure_reaches_joiners(co: AnyCoalescer) -> None:
    gate = Gate()
    gate.error = ConnectionError("redis gone")
    many = asyncio.create_task(co.run_many(["a", "b"], gate.many))
    await settle()
    joiner = asyncio.create_task(co.run("b", lambda: gate.one("b")))
    await settle()
    gate.release.set()
    with pytest.raises(ConnectionError):
        await many
    with pytest.raises(ConnectionError):
        await joiner
    assert len(co) == 0


async def test_run_many_wrong_result_length_is_an_error(co: AnyCoalescer) -> None:
    async def short(keys: list[str]) -> list[str]:
        return keys[:1]

    with pytest.raises(ValueError, match="1 results for 2 keys"):
        await co.run_many(["a", "b"], short)
    await settle()
    assert len(co) == 0


async def test_load_raising_before_it_awaits_leaves_no_entry(co: AnyCoalescer) -> None:
    def not_async(keys: list[str]) -> Awaitable[list[str]]:
        raise RuntimeError("sync failure")

    with pytest.raises(RuntimeError):
        await co.run_many(["a"], not_async)
    with pytest.raises(RuntimeError):
        await co.run("a", lambda: not_async(["a"]))
    assert len(co) == 0 and co.flights == 0


async def test_cancelled_run_many_caller_leaves_batch_running(co: AnyCoalescer) -> None:
    gate = Gate()
    many = asyncio.create_task(co.run_many(["a", "b"], gate.many))
    await settle()
    joiner = asyncio.create_task(co.run("a", lambda: gate.one("a")))
    await settle()
    many.cancel()
    await settle()
    gate.release.set()
    assert await joiner == "v:a"
    await settle()
    assert len(co) == 0 and len(gate.calls) == 1


async def test_forget_detaches_the_flight(co: AnyCoalescer) -> None:
    first, second = Gate(), Gate()
    old = asyncio.create_task(co.run("k", first.one))
    await settle()
    assert co.forget("k") and not co.forget("k")
    new = asyncio.create_task(co.run("k", second.one))
    await settle()
    second.release.set()
    assert await new == "v:k"
    assert len(co) == 0  # the old flight landing later must not drop anything else
    first.release.set()
    assert await old == "v:k"
    await settle()
    assert len(co) == 0 and co.flights == 2


async def test_forget_all_detaches_every_flight(co: AnyCoalescer) -> None:
    first, second = Gate(), Gate()
    olds = [asyncio.create_task(co.run(k, partial(first.one, k))) for k in ("a", "b")]
    await settle()
    assert co.forget_all() == 2 and len(co) == 0
    new = asyncio.create_task(co.run("a", partial(second.one, "a")))
    await settle()
    assert len(co) == 1 and len(second.calls) == 1  # a new load, not the detached one
    second.release.set()
    first.release.set()
    assert await new == "v:a"
    assert [await t for t in olds] == ["v:a", "v:b"]
    await settle()
    assert len(co) == 0


def test_generic_alias_at_run_time() -> None:
    alias = Coalescer[int]
    assert alias.__origin__ is Coalescer  # type: ignore[attr-defined]
    assert isinstance(Coalescer(), Coalescer)
