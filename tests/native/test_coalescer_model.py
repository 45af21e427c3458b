"""The compiled coalescer against its model: random interleavings of callers, load
completions and failures, caller cancellations, forget() and cancel_all(), stepped on one
event loop, must give every caller the same outcome and leave the same table behind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachegw_native.coalescer import Coalescer
from tests.native.models import CoalescerModel

KEYS = st.sampled_from(["a", "b", "c", "d"])


class Loads:
    """Every load an implementation starts, in start order, released by the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.started: list[tuple[tuple[str, ...], asyncio.Future[Any]]] = []

    def one(self, key: str) -> Any:
        async def load() -> Any:
            fut = self.loop.create_future()
            self.started.append(((key,), fut))
            return await fut

        return load

    async def many(self, keys: list[str]) -> Sequence[Any]:
        fut: asyncio.Future[Sequence[Any]] = self.loop.create_future()
        self.started.append((tuple(keys), fut))
        return await fut


def outcome(task: asyncio.Task[Any]) -> tuple[str, object]:
    if not task.done():
        return ("pending", None)
    if task.cancelled():
        return ("cancelled", None)
    exc = task.exception()
    if exc is not None:
        return ("error", f"{type(exc).__name__}: {exc}")
    return ("ok", task.result())


class CoalescerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.impls: list[Any] = [Coalescer(), CoalescerModel()]
        self.loads = [Loads(self.loop), Loads(self.loop)]
        self.callers: list[list[asyncio.Task[Any]]] = [[], []]

    def step(self) -> None:
        for _ in range(6):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(key=KEYS)
    def call(self, key: str) -> None:
        for impl, loads, callers in zip(self.impls, self.loads, self.callers, strict=True):
            callers.append(self.loop.create_task(impl.run(key, loads.one(key))))
        self.step()

    @rule(keys=st.lists(KEYS, min_size=1, max_size=5))
    def call_many(self, keys: list[str]) -> None:
        for impl, loads, callers in zip(self.impls, self.loads, self.callers, strict=True):
            callers.append(self.loop.create_task(impl.run_many(keys, loads.many)))
        self.step()

    @precondition(lambda self: any(not f.done() for _, f in self.loads[0].started))
    @rule(pick=st.integers(0, 50), how=st.sampled_from(["ok", "error", "short", "cancel"]))
    def finish_load(self, pick: int, how: str) -> None:
        open_loads = [i for i, (_, f) in enumerate(self.loads[0].started) if not f.done()]
        index = open_loads[pick % len(open_loads)]
        for loads in self.loads:
            keys, fut = loads.started[index]
            if how == "cancel":
                fut.cancel()
            elif how == "error":
                fut.set_exception(LookupError(f"load {index} failed"))
            else:
                values = [f"{k}@{index}" for k in keys]
                fut.set_result(values[:-1] if how == "short" else values)
        self.step()

    @precondition(lambda self: self.callers[0])
    @rule(pick=st.integers(0, 50))
    def cancel_caller(self, pick: int) -> None:
        for callers in self.callers:
            callers[pick % len(callers)].cancel()
        self.step()

    @rule(key=KEYS)
    def forget(self, key: str) -> None:
        assert self.impls[0].forget(key) == self.impls[1].forget(key)
        self.step()

    @rule()
    def forget_all(self) -> None:
        assert self.impls[0].forget_all() == self.impls[1].forget_all()
        self.step()

    @rule()
    def cancel_all(self) -> None:
        assert self.impls[0].cancel_all() == self.impls[1].cancel_all()
        self.step()

    @invariant()
    def same_state(self) -> None:
        native, model = self.impls
        assert len(native) == len(model)
        assert (native.flights, native.coalesced) == (model.flights, model.coalesced)
        assert [k for k, _ in self.loads[0].started] == [k for k, _ in self.loads[1].started]
        assert [outcome(t) for t in self.callers[0]] == [outcome(t) for t in self.callers[1]]

    def teardown(self) -> None:
        try:
            for loads in self.loads:
                for _, fut in loads.started:
                    fut.cancel()
            self.step()
            for callers in self.callers:
                for task in callers:
                    task.cancel()
            self.step()
            assert all(len(impl) == 0 for impl in self.impls)
            assert all(t.done() for callers in self.callers for t in callers)
        finally:
            self.loop.close()


CoalescerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoalescerMachine = CoalescerMachine.TestCase
