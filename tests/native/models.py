"""Plain-Python models of the native structures, for differential tests only.

They follow the documented behaviour of cachegw_native (l1.pyx, sketch.pyx, hotkeys.pyx)
step by step, favouring obviousness over speed; the gateway never imports them.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cachegw_native.coalescer import LoadCancelledError
from cachegw_native.l1 import ENTRY_OVERHEAD, GROUP_OVERHEAD, MEMBERSHIP_OVERHEAD

T = TypeVar("T")

MASK64 = (1 << 64) - 1
WINDOW, PROBATION, PROTECTED = 0, 1, 2


def fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK64
    x ^= x >> 33
    return x


def sketch_rows(key: object, width: int, depth: int) -> list[int]:
    """Row i's column for `key`: (h1 + i * h2) mod width, from one 64-bit mix."""
    x = fmix64(hash(key) & MASK64)
    h1, h2 = x & 0xFFFFFFFF, (x >> 32) | 1
    return [(h1 + i * h2) & (width - 1) for i in range(depth)]


def pow2_at_least(n: int) -> int:
    w = 1
    while w < n:
        w <<= 1
    return w


def allocated(n: int) -> int:
    """What an allocation of n bytes takes: pymalloc's 16-byte classes up to 512 bytes,
    a malloc chunk (8 bytes more, 16-aligned) above, whole pages from 128 KiB."""
    if n <= 512:
        return -(-n // 16) * 16
    if n + 16 >= 128 * 1024:
        return -(-(n + 16) // 4096) * 4096
    return -(-(n + 8) // 16) * 16


_ASCII_STR = sys.getsizeof("") - 1  # the header of a compact ASCII str
_COMPACT_STR = sys.getsizeof(b"\xe9\xe9".decode("latin-1")) - 3  # of any other str


def str_size(s: str) -> int:
    """sys.getsizeof(s) for a str without a cached UTF-8 copy."""
    if s.isascii():
        return _ASCII_STR + len(s) + 1
    top = max(map(ord, s))
    kind = 1 if top < 0x100 else 2 if top < 0x10000 else 4
    return _COMPACT_STR + (len(s) + 1) * kind


def group_charge(name: str) -> int:
    """What a group with members is charged, with charge_overhead: its record and its
    name as allocated (sys.getsizeof: a shared one-character name may carry a UTF-8 copy
    another test made; str_size is the size without one)."""
    return GROUP_OVERHEAD + allocated(sys.getsizeof(name))


class FrequencySketchModel:
    """4 rows of 4 * capacity counters capped at 15; all halved every 10 * capacity additions."""

    def __init__(self, capacity: int) -> None:
        self.width = pow2_at_least(max(4 * capacity, 16))
        self.sample_size = 10 * capacity
        self.rows = [[0] * self.width for _ in range(4)]
        self.additions = 0
        self.resets = 0

    def increment(self, key: object) -> None:
        for row, col in zip(self.rows, sketch_rows(key, self.width, 4), strict=True):
            row[col] = min(row[col] + 1, 15)
        self.additions += 1
        if self.additions >= self.sample_size:
            self.rows = [[c >> 1 for c in row] for row in self.rows]
            self.additions //= 2
            self.resets += 1

    def estimate(self, key: object) -> int:
        cols = sketch_rows(key, self.width, 4)
        return min(row[col] for row, col in zip(self.rows, cols, strict=True))


class CountMinModel:
    """Count-min with conservative update: only rows at the minimum are raised."""

    def __init__(self, width: int = 4096, depth: int = 4) -> None:
        self.width, self.depth = pow2_at_least(width), depth
        self.rows = [[0] * self.width for _ in range(depth)]

    def add(self, key: object, count: int = 1) -> int:
        cols = sketch_rows(key, self.width, self.depth)
        target = min(min(row[c] for row, c in zip(self.rows, cols, strict=True)) + count, 2**32 - 1)
        for row, c in zip(self.rows, cols, strict=True):
            row[c] = max(row[c], target)
        return target

    def estimate(self, key: object) -> int:
        cols = sketch_rows(key, self.width, self.depth)
        return min(row[c] for row, c in zip(self.rows, cols, strict=True))

    def decay(self) -> None:
        self.rows = [[c >> 1 for c in row] for row in self.rows]


class HotKeysModel:
    """Top-k by estimate: a new key replaces the first smallest tracked one it beats."""

    def __init__(self, capacity: int = 64, width: int = 4096, depth: int = 4) -> None:
        self.capacity = capacity
        self.sketch = CountMinModel(width, depth)
        self.tracked: dict[str, int] = {}

    def add(self, key: str, count: int = 1) -> None:
        est = self.sketch.add(key, count)
        if key in self.tracked or len(self.tracked) < self.capacity:
            self.tracked[key] = est
            return
        low = min(self.tracked, key=self.tracked.__getitem__)
        if est > self.tracked[low]:
            del self.tracked[low]
            self.tracked[key] = est

    def estimate(self, key: str) -> int:
        return self.sketch.estimate(key)

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.tracked.items(), key=lambda kv: (-kv[1], kv[0]))[: max(n, 0)]

    def decay(self) -> None:
        self.sketch.decay()
        self.tracked = {k: v // 2 for k, v in self.tracked.items()}

    def clear(self) -> None:
        self.sketch = CountMinModel(self.sketch.width, self.sketch.depth)
        self.tracked.clear()

    def __len__(self) -> int:
        return len(self.tracked)


@dataclass
class _Entry:
    value: object
    size: int
    expires: float
    hits: int = 0
    seg: int = WINDOW
    groups: frozenset[str] = frozenset()


class L1Model:
    """The L1's observable behaviour; each segment is an OrderedDict, MRU last.

    Groups and prefixes are found by scanning every entry: what the native indexes must
    agree with, whatever way an entry left."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        admission: str,
        clock: Callable[[], float],
        charge_overhead: bool = False,
    ) -> None:
        self.max_entries, self.max_bytes, self.clock = max_entries, max_bytes, clock
        self.charge_overhead = charge_overhead
        self.tinylfu = admission == "tinylfu"
        self.segs: list[OrderedDict[str, _Entry]] = [OrderedDict() for _ in range(3)]
        self.window_n = max(1, max_entries // 100)
        self.window_b = max(1, max_bytes // 100)
        self.protected_n = (max_entries - self.window_n) * 4 // 5
        self.protected_b = (max_bytes - self.window_b) * 4 // 5
        self.sketch = FrequencySketchModel(max_entries)
        self.counters = dict.fromkeys(
            ("hits", "misses", "evictions", "expirations", "admissions_refused"), 0
        )
        self.candidates: list[str] = []

    # -- helpers --------------------------------------------------------------------------

    def _find(self, key: str) -> _Entry | None:
        for seg in self.segs:
            if key in seg:
                return seg[key]
        return None

    def _seg_bytes(self, seg: int) -> int:
        return sum(e.size for e in self.segs[seg].values())

    def __len__(self) -> int:
        return sum(len(s) for s in self.segs)

    @property
    def nbytes(self) -> int:
        """Entries' charges, and with charge_overhead each group with members."""
        total = sum(self._seg_bytes(i) for i in range(3))
        if self.charge_overhead:
            names = {name for seg in self.segs for e in seg.values() for name in e.groups}
            total += sum(map(group_charge, names))
        return total

    def _over(self) -> bool:
        return len(self) > self.max_entries or self.nbytes > self.max_bytes

    def _move(self, key: str, seg: int) -> None:
        entry = self.segs[self._find_seg(key)].pop(key)
        entry.seg = seg
        self.segs[seg][key] = entry

    def _find_seg(self, key: str) -> int:
        return next(i for i, s in enumerate(self.segs) if key in s)

    def _remove(self, key: str) -> None:
        del self.segs[self._find_seg(key)][key]

    def _drop(self, key: str, now: float, refused: bool) -> None:
        entry = self._find(key)
        assert entry is not None
        if now >= entry.expires:
            self.counters["expirations"] += 1
        elif refused:
            self.counters["admissions_refused"] += 1
        else:
            self.counters["evictions"] += 1
        self._remove(key)
        if key in self.candidates:
            self.candidates.remove(key)

    def _touch(self, key: str, entry: _Entry) -> None:
        if not self.tinylfu or entry.seg != PROBATION:
            self.segs[entry.seg].move_to_end(key)
            return
        self._move(key, PROTECTED)
        prot = self.segs[PROTECTED]
        while prot and (len(prot) > self.protected_n or self._seg_bytes(2) > self.protected_b):
            self._move(next(iter(prot)), PROBATION)

    def _victim(self, seg: int, skip: str) -> str | None:
        order = [k for k in self.segs[seg] if k != skip][:1]
        if not order or order[0] in self.candidates:
            return None
        return order[0]

    def _enforce(self, now: float, skip: str) -> None:
        if not self.tinylfu:
            while self._over() and self.segs[WINDOW]:
                self._drop(next(iter(self.segs[WINDOW])), now, refused=False)
            return
        window = self.segs[WINDOW]
        while window and (len(window) > self.window_n or self._seg_bytes(0) > self.window_b):
            key = next(iter(window))
            self._move(key, PROBATION)
            self.candidates.append(key)
        while self._over():
            victim = self._victim(PROBATION, skip)  # not `or`: "" is a key too
            if victim is None:
                victim = self._victim(PROTECTED, skip)
            if victim is None:
                victim = self._victim(WINDOW, skip)
            if not self.candidates:
                if victim is None:
                    break
                self._drop(victim, now, refused=False)
                continue
            cand = self.candidates[0]
            if victim is not None:
                c_entry, v_entry = self._find(cand), self._find(victim)
                assert c_entry is not None and v_entry is not None
                if now < c_entry.expires:
                    if now >= v_entry.expires:
                        self._drop(victim, now, refused=False)
                        continue
                    if self.sketch.estimate(cand) > self.sketch.estimate(victim):
                        self._drop(victim, now, refused=False)
                        continue
            self._drop(cand, now, refused=victim is not None)
        self.candidates.clear()

    # -- the API --------------------------------------------------------------------------

    def get(self, key: str) -> object | None:
        if self.tinylfu:
            self.sketch.increment(key)
        entry = self._find(key)
        if entry is None:
            self.counters["misses"] += 1
            return None
        if self.clock() >= entry.expires:
            self.counters["expirations"] += 1
            self.counters["misses"] += 1
            self._remove(key)
            return None
        entry.hits += 1
        self.counters["hits"] += 1
        self._touch(key, entry)
        return entry.value

    def __contains__(self, key: str) -> bool:
        entry = self._find(key)
        return entry is not None and self.clock() < entry.expires

    def expires_in(self, key: str) -> float | None:
        entry = self._find(key)
        if entry is None:
            return None
        left = entry.expires - self.clock()
        return left if left > 0 else None

    def set(
        self, key: str, value: object, size: int, ttl: float, groups: tuple[str, ...] = ()
    ) -> bool:
        if self.charge_overhead:
            size += ENTRY_OVERHEAD + MEMBERSHIP_OVERHEAD * len(set(groups))
        now = self.clock()
        entry = self._find(key)
        if size > self.max_bytes:
            self.counters["admissions_refused"] += 1
            if entry is not None:
                self._remove(key)
            return False
        if entry is not None:
            entry.size, entry.expires = size, now + ttl
            self._touch(key, entry)
            entry.value, entry.groups = value, frozenset(groups)
        else:
            self.segs[WINDOW][key] = _Entry(value, size, now + ttl, groups=frozenset(groups))
        self._enforce(now, key)
        return self._find(key) is not None

    def delete(self, key: str) -> bool:
        if self._find(key) is None:
            return False
        self._remove(key)
        return True

    def delete_prefix(self, prefix: str) -> int:
        doomed = [k for seg in self.segs for k in seg if k.startswith(prefix)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def delete_group(self, name: str) -> int:
        doomed = [k for seg in self.segs for k, e in seg.items() if name in e.groups]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def group_size(self, name: str) -> int:
        return sum(name in e.groups for seg in self.segs for e in seg.values())

    def purge_expired(self) -> int:
        now = self.clock()
        doomed = [k for seg in self.segs for k, e in seg.items() if now >= e.expires]
        for key in doomed:
            self.counters["expirations"] += 1
            self._remove(key)
        return len(doomed)

    def clear(self) -> None:
        for seg in self.segs:
            seg.clear()

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "entries": len(self),
            "bytes": self.nbytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }

    def hottest(self, n: int) -> list[tuple[str, int]]:
        now = self.clock()
        hot = [
            (k, e.hits) for seg in self.segs for k, e in seg.items() if e.hits and now < e.expires
        ]
        return sorted(hot, key=lambda kv: (-kv[1], kv[0]))[: max(n, 0)]

    def items(self) -> list[tuple[str, object]]:
        now = self.clock()
        return sorted(
            ((k, e.value) for seg in self.segs for k, e in seg.items() if now < e.expires),
            key=lambda kv: kv[0],
        )

    def segments(self) -> dict[str, int]:
        if not self.tinylfu:
            return {"lru": len(self.segs[WINDOW])}
        names = ("window", "probation", "protected")
        return {name: len(seg) for name, seg in zip(names, self.segs, strict=True)}


class FakeClock:
    """A monotonic clock the test drives."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CoalescerModel(Generic[T]):
    """The coalescer's contract in plain asyncio: one task per flight, callers wait on it
    without owning it, the table entry is dropped in the flight's first done callback."""

    def __init__(self) -> None:
        self.table: dict[str, asyncio.Future[Any]] = {}
        self.batches: set[asyncio.Future[Any]] = set()
        self.coalesced = 0
        self.flights = 0

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, key: object) -> bool:
        return key in self.table

    def _track(self, key: str, fut: asyncio.Future[Any]) -> None:
        self.table[key] = fut

        def landed(done: asyncio.Future[Any]) -> None:
            if self.table.get(key) is done:
                del self.table[key]
            if not done.cancelled():
                done.exception()

        fut.add_done_callback(landed)

    def forget(self, key: str) -> bool:
        return self.table.pop(key, None) is not None

    def forget_all(self) -> int:
        n = len(self.table)
        self.table.clear()
        return n

    def cancel_all(self) -> int:
        n = len(self.table)
        for fut in [*self.batches, *self.table.values()]:
            fut.cancel()
        return n

    @staticmethod
    def _outcome(key: str, fut: asyncio.Future[Any]) -> Any:
        if fut.cancelled():
            raise LoadCancelledError(f"the shared load for {key!r} was cancelled")
        return fut.result()

    async def run(self, key: str, load: Callable[[], Awaitable[T]]) -> T:
        fut = self.table.get(key)
        if fut is None:
            fut = asyncio.ensure_future(load())
            self._track(key, fut)
            self.flights += 1
        else:
            self.coalesced += 1
        if not fut.done():
            await asyncio.wait((fut,))
        result: T = self._outcome(key, fut)
        return result

    async def run_many(
        self, keys: Sequence[str], load_many: Callable[[list[str]], Awaitable[Sequence[T]]]
    ) -> list[T]:
        loop = asyncio.get_running_loop()
        mine: dict[str, asyncio.Future[Any]] = {}
        joined: set[str] = set()
        futs: list[asyncio.Future[Any]] = []
        for key in keys:
            fut = mine.get(key) or self.table.get(key)
            if fut is None:
                fut = mine[key] = loop.create_future()
            elif key not in mine and key not in joined:
                joined.add(key)
                self.coalesced += 1
            futs.append(fut)
        if mine:
            missing = list(mine)
            batch = asyncio.ensure_future(load_many(list(missing)))
            for key in missing:
                self._track(key, mine[key])
            self.flights += 1
            self.batches.add(batch)
            batch.add_done_callback(self.batches.discard)

            def fan_out(done: asyncio.Future[Sequence[T]]) -> None:
                if done.cancelled():
                    for fut in mine.values():
                        fut.cancel()
                    return
                error = done.exception()
                results: list[T] = []
                if error is None:
                    results = list(done.result())
                    if len(results) != len(missing):
                        error = ValueError(
                            f"load_many returned {len(results)} results for {len(missing)} keys"
                        )
                for i, key in enumerate(missing):
                    if mine[key].done():
                        continue
                    if error is not None:
                        mine[key].set_exception(error)
                    else:
                        mine[key].set_result(results[i])

            batch.add_done_callback(fan_out)
        pending = {fut for fut in futs if not fut.done()}
        if pending:
            await asyncio.wait(pending)
        return [self._outcome(key, fut) for key, fut in zip(keys, futs, strict=True)]


def l1_results_model(
    l1: L1Model,
    keys: list[str],
    now: float,
    hotkeys: object | None,
    tables: tuple[list[bytes], list[bytes], list[bytes]],
) -> tuple[list[bytes], list[int]]:
    """cachegw_native.batch.l1_results in plain Python: GetMany's L1 part over the
    gateway's value layout (answer, fresh_until, counters, framing)."""
    low, mid, high = tables
    pieces: list[bytes] = [b""] * (5 * len(keys))
    missing: list[int] = []
    for i, key in enumerate(keys):
        hit: tuple[bytes, float, Any, bytes] | None = l1.get(key)  # type: ignore[assignment]
        if hit is None:
            missing.append(i)
            continue
        body, fresh_until, counters, framing = hit
        counters.hits_l1 += 1
        if hotkeys is not None:
            hotkeys.add(key)  # type: ignore[attr-defined]
        ms = max(int((fresh_until - now) * 1000), 0)
        pieces[5 * i : 5 * i + 5] = (
            framing,
            body,
            low[ms & 0x3FFF],
            mid[(ms >> 14) & 0x3FFF],
            high[(ms >> 28) & 0x7F],
        )
    return pieces, missing
