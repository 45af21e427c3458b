# cython: language_level=3
"""Request coalescing: at most one in-flight load per key per event loop.

The first caller of a key starts the load as its own task (a "flight") and every caller,
the first included, waits for that task without owning it. So a cancelled caller only
stops waiting: the load goes on for the others and its result still lands. An exception
raised by the load reaches every caller. A flight that is itself cancelled (only code
holding the task could do that, e.g. loop shutdown or cancel_all()) fails every waiter
with LoadCancelledError rather than a CancelledError they did not ask for.

The table entry goes away in the task's first done callback, before any waiter resumes,
so once every caller has returned the table is empty. Threads: one event loop, no locks.
"""

import asyncio
from functools import partial
from types import GenericAlias


class LoadCancelledError(RuntimeError):
    """The shared load for a key was cancelled (not by this caller); retrying is safe."""


cdef class Coalescer:
    """Per-key in-flight table for one event loop."""

    def __cinit__(self):
        self._inflight = {}
        self._batches = set()

    @classmethod
    def __class_getitem__(cls, item):
        return GenericAlias(cls, item)

    def __len__(self):
        """Keys in flight now."""
        return len(self._inflight)

    def __contains__(self, key):
        return key in self._inflight

    cdef _track(self, str key, object fut):
        self._inflight[key] = fut
        fut.add_done_callback(partial(self._landed, key))

    def _landed(self, key, fut):
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved here, so an abandoned failure is not logged as lost

    def forget(self, str key):
        """Detach the flight for `key` (e.g. the key was just written or invalidated): its
        current waiters still get its result, later callers start a new load."""
        return self._inflight.pop(key, None) is not None

    def forget_all(self):
        """Detach every flight (a broad invalidation); returns how many keys were in flight."""
        cdef Py_ssize_t n = len(self._inflight)
        self._inflight.clear()
        return n

    def cancel_all(self):
        """Cancel every flight (shutdown); their waiters get LoadCancelledError. Returns how
        many keys were in flight."""
        cdef Py_ssize_t n = len(self._inflight)
        for batch in list(self._batches):
            batch.cancel()
        for fut in list(self._inflight.values()):
            fut.cancel()
        return n

    async def run(self, str key, load):
        """The result of `load()` for `key`: join the flight for `key` or start one."""
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(load())
            self._track(key, fut)
            self.flights += 1
        else:
            self.coalesced += 1
        if not fut.done():
            await asyncio.wait((fut,))
        return _outcome(key, fut)

    async def run_many(self, keys, load_many):
        """Results for `keys`, in order. Keys in flight join their flights; all others are
        loaded by one `load_many(missing)` call whose results come back in the same order.
        Duplicate keys are loaded once."""
        cdef list futs = []
        cdef list missing = []
        cdef dict mine = {}
        cdef set joined = set()
        for key in keys:
            fut = mine.get(key)
            if fut is None:
                fut = self._inflight.get(key)
                if fut is None:
                    fut = asyncio.get_running_loop().create_future()
                    mine[key] = fut
                    missing.append(key)
                elif key not in joined:
                    joined.add(key)
                    self.coalesced += 1
            futs.append(fut)
        if missing:
            batch = asyncio.ensure_future(load_many(list(missing)))  # may raise: nothing tracked yet
            for key in missing:
                self._track(key, mine[key])
            self.flights += 1
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)
            batch.add_done_callback(partial(_fan_out, missing, [mine[k] for k in missing]))
        pending = {fut for fut in futs if not fut.done()}
        if pending:
            await asyncio.wait(pending)
        return [_outcome(key, fut) for key, fut in zip(keys, futs)]


def _outcome(key, fut):
    if fut.cancelled():
        raise LoadCancelledError(f"the shared load for {key!r} was cancelled")
    return fut.result()


def _fan_out(list missing, list futs, batch):
    """Hand one load_many result (or its failure) to the per-key futures."""
    cdef object error = None
    cdef list results = []
    if batch.cancelled():
        for fut in futs:
            fut.cancel()
        return
    error = batch.exception()
    if error is None:
        results = list(batch.result())
        if len(results) != len(missing):
            error = ValueError(
                f"load_many returned {len(results)} results for {len(missing)} keys"
            )
    for i, fut in enumerate(futs):
        if fut.done():  # cancelled by cancel_all()
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(results[i])
