"""The client's near cache: a small in-process copy of hot values, kept honest by the
gateway's invalidation stream.

Rules (the same as a gateway's L1):

- it is filled only while the client's Subscribe stream is open and registered with the
  gateway, so every invalidation from then on reaches it;
- an event evicts what it names: keys, prefixes, tags (each copy remembers the tags it
  was stored with) and classes; a RESET, or the stream dropping, empties it;
- a read whose answer may predate an event that arrived meanwhile does not fill it;
- a copy lives at most `ttl` seconds and never past the fresh life the gateway reported
  (`Entry.ttl_remaining`), so it is never older than its class's TTL; STALE answers are
  never copied.

Storage is the gateway's native L1 (`cachegw_native.l1.L1Cache`) when that package is
installed, else a small pure-Python LRU. Either way one lock guards it: the blocking
client reads from any thread while its stream thread applies events.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

from cachegw.models import Entry, Event, EventKind, Status

__all__ = ["NearCache"]

# Bytes charged per copy besides key and value.
_OVERHEAD = 96
# Keys remembered with the event that last named them; past this, the memory is dropped
# and counted as one broad event (reads in flight then simply do not fill).
_KEY_MEMORY = 100_000

_Copy = tuple[bytes, str, tuple[str, ...]]  # value, key class, tags


class _Store(Protocol):
    def get(self, key: str, /) -> object | None: ...
    def set(self, key: str, value: object, size: int, ttl: float) -> bool: ...
    def delete(self, key: str, /) -> bool: ...
    def delete_prefix(self, prefix: str, /) -> int: ...
    def items(self) -> list[tuple[str, object]]: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...


class _PyLRU:
    """What the native L1 does, minus its speed: LRU over entries and bytes, with TTL."""

    def __init__(
        self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._data: OrderedDict[str, tuple[object, int, float]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, /) -> object | None:
        item = self._data.get(key)
        if item is None:
            return None
        if self._clock() >= item[2]:
            self.delete(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def set(self, key: str, value: object, size: int, ttl: float) -> bool:
        self.delete(key)
        if size > self._max_bytes:
            return False
        self._data[key] = (value, size, self._clock() + ttl)
        self._bytes += size
        while len(self._data) > self._max_entries or self._bytes > self._max_bytes:
            _, (_, old_size, _) = self._data.popitem(last=False)
            self._bytes -= old_size
        return key in self._data

    def delete(self, key: str, /) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._bytes -= item[1]
        return True

    def delete_prefix(self, prefix: str, /) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for key in doomed:
            self.delete(key)
        return len(doomed)

    def items(self) -> list[tuple[str, object]]:
        now = self._clock()
        return [(k, v) for k, (v, _, exp) in self._data.items() if now < exp]

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0


def _native_store(max_entries: int, max_bytes: int) -> _Store | None:
    try:
        # Optional: cachegw-gateway's compiled L1, when that package is installed.
        from cachegw_native.l1 import L1Cache
    except ImportError:
        return None
    return L1Cache(max_entries, max_bytes)


class NearCache:
    """A near cache for one `Client` or `AsyncClient` (pass it as ``near_cache=``).

    `max_entries` and `max_bytes` bound it; `ttl` is the longest a copy is served without
    asking the gateway (it is also bounded by what the gateway says is left);
    `class_ttl` gives some key classes their own (e.g. the gateway's `l1_ttl_seconds` of
    a class whose copies must not outlive a lost event by more than that).
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        ttl: float = 5.0,
        *,
        class_ttl: Mapping[str, float] | None = None,
        native: bool | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be >= 1")
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        self.class_ttl = dict(class_ttl or {})
        for name, seconds in self.class_ttl.items():
            if not seconds > 0:
                raise ValueError(f"class_ttl[{name!r}] must be > 0 seconds")
        store = None if native is False else _native_store(max_entries, max_bytes)
        if store is None and native:
            raise ImportError("the native L1 (cachegw-gateway's cachegw_native) is not installed")
        self._store: _Store = store if store is not None else _PyLRU(max_entries, max_bytes)
        self.native = store is not None
        self.ttl = ttl
        self._lock = threading.Lock()
        self._live = False
        self._seq = 0  # events applied so far
        self._broad_seq = 0  # the last event that named more than keys
        self._key_seq: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.events = 0
        self.resets = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._store)

    @property
    def live(self) -> bool:
        """Whether the invalidation stream is open: only then is the cache filled."""
        return self._live

    # -- reads ----------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._lock:
            copy = self._store.get(key)
            if copy is None:
                self.misses += 1
                return None
            self.hits += 1
            value: bytes = copy[0]  # type: ignore[index]
            return value

    def get_many(self, keys: list[str]) -> tuple[list[bytes | None], list[str]]:
        """(the cached value or None per key, the keys to ask the gateway for)."""
        values = [self.get(k) for k in keys]
        return values, [k for k, v in zip(keys, values, strict=True) if v is None]

    def fill_many(
        self, keys: list[str], values: list[bytes | None], fetched: list[Entry], ticket: int
    ) -> list[bytes | None]:
        """`values` completed, in order, with the gateway's answers for the missing keys."""
        answers = iter(fetched)
        for i, value in enumerate(values):
            if value is None:
                entry = next(answers)
                self.fill(keys[i], entry, ticket)
                values[i] = entry.value
        return values

    def ticket(self) -> int:
        """Taken before asking the gateway; `fill` with it refuses an answer that an
        event arriving meanwhile may have made stale."""
        return self._seq

    def fill(self, key: str, entry: Entry, ticket: int) -> None:
        if entry.status is not Status.HIT or entry.value is None:
            return
        ttl = min(self.class_ttl.get(entry.key_class, self.ttl), entry.ttl_remaining)
        if ttl <= 0:
            return
        copy: _Copy = (entry.value, entry.key_class, entry.tags)
        size = len(entry.value) + len(key) + _OVERHEAD
        with self._lock:
            if not self._live or self._broad_seq > ticket or self._key_seq.get(key, 0) > ticket:
                return
            self._store.set(key, copy, size, ttl)

    # -- invalidation ---------------------------------------------------------------------

    def forget(self, keys: tuple[str, ...] | list[str]) -> None:
        """This client wrote or deleted `keys`: drop its own copies at once."""
        self.apply(Event(id="", kind=EventKind.KEYS, keys=tuple(keys)))

    def apply(self, event: Event) -> None:
        with self._lock:
            self._seq += 1
            self.events += 1
            if event.kind is EventKind.RESET:
                self._flush()
                return
            for key in event.keys:
                self._store.delete(key)
                self._key_seq[key] = self._seq
            if len(self._key_seq) > _KEY_MEMORY:
                self._key_seq.clear()
                self._broad_seq = self._seq
            if not (event.prefixes or event.tags or event.classes):
                return
            self._broad_seq = self._seq
            for prefix in event.prefixes:
                self._store.delete_prefix(prefix)
            if event.tags or event.classes:
                tags, classes = frozenset(event.tags), frozenset(event.classes)
                doomed = [
                    key
                    for key, copy in self._store.items()
                    if copy[1] in classes or not tags.isdisjoint(copy[2])  # type: ignore[index]
                ]
                for key in doomed:
                    self._store.delete(key)

    def _flush(self) -> None:
        self._store.clear()
        self._key_seq.clear()
        self._broad_seq = self._seq
        self.resets += 1

    def go_live(self) -> None:
        """The stream is registered with the gateway: from now on every event arrives."""
        with self._lock:
            self._seq += 1
            self._flush()
            self._live = True

    def go_dark(self) -> None:
        """The stream dropped: events may be missed, so nothing cached can be trusted."""
        with self._lock:
            self._live = False
            self._seq += 1
            self._flush()
