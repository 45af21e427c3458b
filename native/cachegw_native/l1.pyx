# cython: language_level=3, always_allow_keywords=False
"""The gateway's L1: an O(1) in-process cache with per-entry TTL, entry and byte bounds,
LRU eviction or W-TinyLFU admission, and counters.

Threads: an L1Cache belongs to one thread (the gateway's event loop). It takes no lock and
never releases the GIL; every method runs to completion without calling back into Python,
except the injected test clock and the dropping of values. Values must therefore not
re-enter the cache from a finalizer, and the cache must not be shared between threads.

Storage (table.pxd): entries live in an array of 64-byte slots with an open-addressing
index, so a hit touches one index word and one slot besides the LRU neighbours, and a set
allocates no Python object (the indexes below grow C arrays now and then). Keys must be
str; a lookup with any other key is a miss. Values are held by the slots, out of the
cyclic GC's sight: a value must not refer back to the cache.

Clock: with ``clock=None`` expiry reads the kernel's CLOCK_MONOTONIC_COARSE (about 7 ns
here against 30 ns for CLOCK_MONOTONIC). The coarse clock never runs ahead of the precise
one, so it is used as is to stamp expiry at set() (an entry may expire up to one tick
early) and on get() only to prove an entry fresh when its expiry is more than
PRECISE_WINDOW seconds away; closer to expiry get() reads CLOCK_MONOTONIC. An entry is
therefore never served after its TTL, as long as the coarse clock lags the precise one by
less than PRECISE_WINDOW (it lags by at most one tick, a few milliseconds).

W-TinyLFU (``admission="tinylfu"``): new entries enter a window LRU (1 % of both bounds);
what overflows the window becomes a candidate for the main area, a segmented LRU
(probation, and protected: 80 % of the main area; a hit in probation promotes). When the
cache is over a bound, the oldest candidate meets the probation LRU entry (else the
protected LRU, else the window LRU) and the one the frequency sketch rates more popular
stays; ties keep the incumbent. The sketch (sketch.FrequencySketch) counts reads, hits
and misses alike, not writes: a miss followed by its fill counts once. A losing candidate
counts as an admission refused; an entry removed by a bound counts as an expiration if it
had expired. The window is fixed at 1 % (Caffeine adapts it); Python's salted str hash
keeps an attacker from aiming collisions at the sketch, so there is no random admission.

Indexes (l1index.pyx), so that a broad invalidation costs what it removes, not what the
cache holds: every key also sits in a KeyOrder (sorted chunks of key references), which
makes delete_prefix O(log n + removed); ``set(..., groups=(...))`` makes the entry a
member of each named group in a GroupIndex (linked member nodes per group and per slot),
which makes delete_group O(removed x log n) (the log n is each removal's exit from the
key order). An entry leaves the key order and all of its groups in _remove, whichever way
it leaves: delete, delete_prefix/delete_group, eviction, expiry on read, purge or bound,
admission refusal, an oversize set, replacement by a set with other groups, clear().
The read path (_lookup on a hit) touches neither index. A set of a new key pays an
O(log n) insert into the key order, and its eviction an O(log n) removal (about 0.2 µs
each at 100 000 entries on the 2-core development machine), plus O(1) per group joined
or left: set-with-eviction went from 0.21 to 0.62 µs without groups, 0.96 µs with three;
a refresh with the same groups did not change (benchmarks/bench_l1_index.py).

Memory: an entry takes a 64-byte slot, a word of the hash index and a reference in the
key order; a group membership a 20-byte member node (and the slot a 4-byte chain head);
a group with members a 32-byte record, words of the name table and a reference that
keeps its name string alive. The slot array and the group arrays grow by a quarter, not
by doubling; the hash index doubles when half full; key-order chunks stay 25-100 % full
(full when keys arrive in rising or falling order). So the memory per entry stays in a
narrow band: measured with ``_footprint()`` (benchmarks/bench_l1_memory.py) 64-73 bytes
of slot, 21-28 of hash index, 10-14 of key order, 25-29 per membership with the chain
head, about 55-60 per group record. With ``charge_overhead=True`` the cache charges that
memory on top of each set()'s ``size``: ENTRY_OVERHEAD (120) per entry,
MEMBERSHIP_OVERHEAD (24) per distinct group it joins, and per group with members
GROUP_OVERHEAD (64, l1index) plus its name string's allocation (``allocated()``: what
CPython's allocators take for an object of that size). ``nbytes`` and the byte bound then
count it, and an entry whose own charge exceeds max_bytes is refused. Without it (the
default) ``size`` alone is charged. A set() that finds fewer than half of the slots in use
first compacts the storage: the live slots are renumbered, in order, into arrays sized
for them (a quarter to spare), with a new hash index and group index; O(n), at most
once per n/2 removals, and invisible otherwise. A cache that once held many more entries
(small values, then large ones) thus gives that memory back instead of keeping it
uncharged. The TinyLFU sketch (16-32 bytes per max_entries, allocated at construction)
is outside every charge.
"""

from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int8_t, int32_t, uint64_t
from libc.string cimport memset

import heapq
from sys import getsizeof

from cachegw_native.l1index cimport GroupIndex, KeyOrder, check_names, distinct_names
from cachegw_native.sketch cimport FrequencySketch, freq_record
from cachegw_native.table cimport (
    Slot,
    cg_allocated,
    cg_str_hash,
    cg_str_size,
    index_delete,
    index_find,
    index_insert,
)

from cachegw_native.l1index import GROUP_OVERHEAD

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        Py_ssize_t tp_basicsize
        Py_ssize_t tp_itemsize
    PyTypeObject* Py_TYPE(PyObject* o)
    Py_ssize_t Py_SIZE(PyObject* o)
    bint PyUnicode_Check(PyObject* o)
    bint PyUnicode_CheckExact(PyObject* o)
    bint PyUnicode_IS_COMPACT_ASCII(PyObject* o)
    bint PyBytes_CheckExact(PyObject* o)
    bint PyTuple_CheckExact(PyObject* o)
    bint PyFloat_CheckExact(PyObject* o)
    bint PyLong_CheckExact(PyObject* o)
    bint PyObject_IS_GC(PyObject* o)

cdef extern from *:
    """
    #include <time.h>
    #ifndef CLOCK_MONOTONIC_COARSE
    #define CLOCK_MONOTONIC_COARSE CLOCK_MONOTONIC
    #endif
    static inline double cg_clock(clockid_t which) {
        struct timespec ts;
        clock_gettime(which, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    """
    ctypedef int clockid_t
    clockid_t CLOCK_MONOTONIC
    clockid_t CLOCK_MONOTONIC_COARSE
    double cg_clock(clockid_t which) noexcept nogil

PRECISE_WINDOW = 1.0
cdef double _PRECISE_WINDOW = PRECISE_WINDOW
cdef Py_ssize_t _FIRST_CAP = 64
cdef Py_ssize_t _MAX_ENTRIES = (1 << 30)

# The L1's own memory per entry, charged on top of `size` by an
# L1Cache(charge_overhead=True) (see "Memory" in the module docstring):
# ENTRY_OVERHEAD: its 64-byte slot (+ up to 25 % growth slack), its hash index word
# (8 bytes at a load between 1/4 and 1/2), its reference in the key order (8 bytes in
# chunks 50-100 % full) and its group chain head (4 bytes + slack);
# MEMBERSHIP_OVERHEAD: one 20-byte member node (+ slack) per distinct group it joins;
# GROUP_OVERHEAD (l1index) + the name's allocation: per group with members.
ENTRY_OVERHEAD = 120
MEMBERSHIP_OVERHEAD = 24
cdef Py_ssize_t _ENTRY_OVERHEAD = ENTRY_OVERHEAD
cdef Py_ssize_t _MEMBERSHIP_OVERHEAD = MEMBERSHIP_OVERHEAD


def allocated(Py_ssize_t n):
    """Bytes an allocation of `n` bytes takes: CPython's small-object allocator rounds up
    to 16 bytes up to 512; above, a malloc chunk adds 8 bytes and 16-byte alignment, and
    from 128 KiB whole pages. `allocated(sys.getsizeof(obj))` is what `obj` takes."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return cg_allocated(n)


# What sys.getsizeof adds for an object the cyclic GC tracks (its PyGC_Head).
cdef Py_ssize_t _GC_HEAD = getsizeof(()) - ().__sizeof__()


cdef inline Py_ssize_t _object_size(object obj) except -1:
    # sys.getsizeof(obj), computed in C for the types an entry is made of (exact bytes,
    # tuple, float, int: their __sizeof__ is the type's basic size plus its items; an
    # ASCII str), through sys.getsizeof for anything else.
    cdef PyObject* o = <PyObject*>obj
    cdef PyTypeObject* t = Py_TYPE(o)
    cdef Py_ssize_t n
    if PyUnicode_CheckExact(o):
        if PyUnicode_IS_COMPACT_ASCII(o):
            return cg_str_size(o)
        return getsizeof(obj)  # it may hold a UTF-8 copy too
    if not (PyBytes_CheckExact(o) or PyTuple_CheckExact(o) or PyFloat_CheckExact(o)
            or PyLong_CheckExact(o)):
        return getsizeof(obj)
    n = Py_SIZE(o)
    n = t.tp_basicsize + (n if n >= 0 else -n) * t.tp_itemsize
    if PyObject_IS_GC(o):
        n += _GC_HEAD
    return n


def footprint(*objects):
    """Bytes `objects` take in memory, each counted alone: the sum of
    allocated(sys.getsizeof(obj)). What a caller charges for the objects an entry holds."""
    cdef Py_ssize_t total = 0
    for obj in objects:
        total += cg_allocated(_object_size(obj))
    return total


cdef class L1Cache:
    """Single-threaded (one asyncio event loop); not thread-safe, no locking.

    ``max_entries`` and ``max_bytes`` both bound the cache; ``size`` passed to set() is what
    an entry charges against ``max_bytes``. ``clock`` returns monotonic seconds; None reads
    the kernel clock directly (see the module docstring).
    """

    def __init__(self, Py_ssize_t max_entries, Py_ssize_t max_bytes, *,
                 str admission="lru", clock=None, bint charge_overhead=False):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be >= 1")
        if max_entries > _MAX_ENTRIES:
            raise ValueError(f"max_entries must be <= {_MAX_ENTRIES}")
        if admission not in ("lru", "tinylfu"):
            raise ValueError(f"admission must be 'lru' or 'tinylfu', not {admission!r}")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning seconds, or None")
        if self._max_entries:
            raise RuntimeError("L1Cache.__init__ called twice")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._charge_overhead = charge_overhead
        self._tinylfu = admission == "tinylfu"
        self._window_n = max(1, max_entries // 100)
        self._window_b = max(1, max_bytes // 100)
        self._protected_n = (max_entries - self._window_n) * 4 // 5
        self._protected_b = (max_bytes - self._window_b) * 4 // 5
        self._sketch = FrequencySketch(max_entries) if self._tinylfu else None
        PyMem_Free(self._slots)
        PyMem_Free(self._index)
        self._slots, self._index = NULL, NULL
        self._allocate(min(_FIRST_CAP, max_entries + 1) + FIRST_SLOT)
        self._order = KeyOrder()
        self._groups = GroupIndex()

    def __cinit__(self, *args, **kwargs):
        # Valid (empty, zero-bound) storage even for an object __init__ never ran on.
        self._allocate(FIRST_SLOT + 1)
        self._order = KeyOrder()
        self._groups = GroupIndex()

    def __dealloc__(self):
        cdef Slot* slots = self._slots
        cdef Py_ssize_t s
        self._slots = NULL
        if slots != NULL:
            for s in range(FIRST_SLOT, self._used):
                if slots[s].key != NULL:
                    Py_DECREF(<object>slots[s].key)
                    Py_DECREF(<object>slots[s].value)
            PyMem_Free(slots)
        PyMem_Free(self._index)
        self._index = NULL

    # -- storage --------------------------------------------------------------------------

    cdef int _allocate(self, Py_ssize_t cap) except -1:
        # Fresh, empty storage for `cap` slots (list heads included).
        cdef Py_ssize_t width = 16
        cdef int seg
        while width < 2 * cap:
            width <<= 1
        self._slots = <Slot*>PyMem_Calloc(cap, sizeof(Slot))
        self._index = <uint64_t*>PyMem_Calloc(width, sizeof(uint64_t))
        if self._slots == NULL or self._index == NULL:
            raise MemoryError()
        self._cap, self._used, self._free = cap, FIRST_SLOT, -1
        self._mask = <uint64_t>(width - 1)
        for seg in range(3):
            self._slots[seg].prev = seg
            self._slots[seg].next = seg
            self._slots[seg].seg = seg
            self._seg_n[seg] = 0
            self._seg_b[seg] = 0
        self._count = 0
        self._bytes = 0
        return 0

    cdef int _grow(self) except -1:
        # A quarter more slots (at most max_entries + 1 live: set() inserts before it
        # evicts): by quarters, not doubling, so that the slack stays within what
        # ENTRY_OVERHEAD charges. The index grows with the entries (set()).
        cdef Py_ssize_t cap = min(self._cap + max(self._cap // 4, 16),
                                  self._max_entries + 1 + FIRST_SLOT)
        cdef Slot* slots = <Slot*>PyMem_Realloc(self._slots, cap * sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        memset(&slots[self._cap], 0, (cap - self._cap) * sizeof(Slot))
        self._slots, self._cap = slots, cap
        return 0

    cdef int _rehash(self, Py_ssize_t width) except -1:
        # A new index `width` words wide (a power of two) over the live slots.
        cdef uint64_t* index = <uint64_t*>PyMem_Calloc(width, sizeof(uint64_t))
        cdef Py_ssize_t s
        if index == NULL:
            raise MemoryError()
        PyMem_Free(self._index)
        self._index, self._mask = index, <uint64_t>(width - 1)
        for s in range(FIRST_SLOT, self._used):
            if self._slots[s].key != NULL:
                index_insert(index, self._mask, self._slots[s].hash, s)
        return 0

    cdef int _compact(self) except -1:
        # Renumber the live slots FIRST_SLOT.. in order into storage sized for them (a
        # quarter to spare), with a fresh index and group index, so that a cache which
        # held many more entries than now gives that memory back instead of keeping it
        # uncharged. Only at the start of set(), when no slot number is held anywhere;
        # unobservable otherwise (the lists keep their order, chains their groups).
        cdef Py_ssize_t n = self._count, used = self._used, s, t
        cdef Py_ssize_t cap = min(max(n + n // 4 + 1, min(_FIRST_CAP, self._max_entries + 1)),
                                  self._max_entries + 1) + FIRST_SLOT
        cdef Py_ssize_t width = 16
        cdef Slot* old = self._slots
        cdef Slot* slots
        cdef uint64_t* index
        cdef int32_t* where
        cdef GroupIndex groups
        while width < 2 * (n + 1):
            width <<= 1
        slots = <Slot*>PyMem_Calloc(cap, sizeof(Slot))
        index = <uint64_t*>PyMem_Calloc(width, sizeof(uint64_t))
        where = <int32_t*>PyMem_Calloc(used, sizeof(int32_t))
        try:
            if slots == NULL or index == NULL or where == NULL:
                raise MemoryError()
            t = FIRST_SLOT
            for s in range(used):
                if s < FIRST_SLOT:
                    where[s] = <int32_t>s
                    slots[s] = old[s]
                elif old[s].key != NULL:
                    where[s] = <int32_t>t
                    slots[t] = old[s]
                    t += 1
            groups = self._groups.renumbered(where, used)
        except BaseException:
            PyMem_Free(slots)
            PyMem_Free(index)
            PyMem_Free(where)
            raise
        for t in range(FIRST_SLOT + n):
            slots[t].prev = where[slots[t].prev]
            slots[t].next = where[slots[t].next]
            if t >= FIRST_SLOT:
                index_insert(index, <uint64_t>(width - 1), slots[t].hash, t)
        PyMem_Free(where)
        PyMem_Free(old)
        PyMem_Free(self._index)
        self._slots, self._index, self._mask = slots, index, <uint64_t>(width - 1)
        self._cap, self._used, self._free = cap, FIRST_SLOT + n, -1
        if self._charge_overhead:
            self._bytes += groups._charge - self._groups._charge  # the same groups: 0
        self._groups = groups
        return 0

    cdef Py_ssize_t _new_slot(self) except -1:
        cdef Py_ssize_t s = self._free
        if s >= 0:
            self._free = self._slots[s].next
            return s
        if self._used == self._cap:
            self._grow()
        s = self._used
        self._used += 1
        return s

    cdef list _live_slots(self):
        return [s for s in range(FIRST_SLOT, self._used) if self._slots[s].key != NULL]

    # -- time -----------------------------------------------------------------------------

    cdef double _now(self) except? -1.0:
        # Stamps expiry and classifies removals; coarse is safe for both (never ahead).
        if self._clock is None:
            return cg_clock(CLOCK_MONOTONIC_COARSE)
        return self._clock()

    cdef double _exact_now(self) except? -1.0:
        if self._clock is None:
            return cg_clock(CLOCK_MONOTONIC)
        return self._clock()

    cdef bint _fresh(self, Py_ssize_t s) except -1:
        if self._clock is None:
            if cg_clock(CLOCK_MONOTONIC_COARSE) + _PRECISE_WINDOW < self._slots[s].expires:
                return True
            return cg_clock(CLOCK_MONOTONIC) < self._slots[s].expires
        return self._clock() < self._slots[s].expires

    # -- lists ----------------------------------------------------------------------------

    cdef void _link(self, Py_ssize_t s, int seg) noexcept:
        # Make slot `s` the most recent of list `seg`.
        cdef Slot* slots = self._slots
        slots[s].next = slots[seg].next
        slots[s].prev = seg
        slots[slots[seg].next].prev = <int32_t>s
        slots[seg].next = <int32_t>s
        slots[s].seg = <int8_t>seg
        self._seg_n[seg] += 1
        self._seg_b[seg] += slots[s].size

    cdef void _unlink(self, Py_ssize_t s) noexcept:
        cdef Slot* slots = self._slots
        slots[slots[s].prev].next = slots[s].next
        slots[slots[s].next].prev = slots[s].prev
        self._seg_n[slots[s].seg] -= 1
        self._seg_b[slots[s].seg] -= slots[s].size

    cdef void _touch(self, Py_ssize_t s) noexcept:
        # A hit or an update: recency, and in TinyLFU promotion out of probation.
        cdef int seg = self._slots[s].seg
        self._unlink(s)
        if not self._tinylfu or seg != SEG_PROBATION:
            self._link(s, seg)
            return
        self._link(s, SEG_PROTECTED)
        while self._seg_n[SEG_PROTECTED] > 0 and (
            self._seg_n[SEG_PROTECTED] > self._protected_n
            or self._seg_b[SEG_PROTECTED] > self._protected_b
        ):
            s = self._slots[SEG_PROTECTED].prev
            self._unlink(s)
            self._link(s, SEG_PROBATION)

    # -- removal --------------------------------------------------------------------------

    cdef int _remove(self, Py_ssize_t s) except -1:
        # Every way out of the cache ends here (or in _unstore, for keys already taken
        # out of the order by delete_prefix).
        self._order._remove(self._slots[s].key)
        return self._unstore(s)

    cdef int _unstore(self, Py_ssize_t s) except -1:
        # Structure first, references last: dropping a value may run arbitrary finalizers.
        cdef Slot* slot = &self._slots[s]
        cdef PyObject* key = slot.key
        cdef PyObject* value = slot.value
        cdef Py_ssize_t groups_before = self._groups._charge
        self._unlink(s)
        self._groups.leave(s)
        if self._charge_overhead:
            self._bytes -= groups_before - self._groups._charge
        index_delete(self._index, self._mask, slot.hash, s)
        self._count -= 1
        self._bytes -= slot.size
        slot.key = NULL
        slot.value = NULL
        slot.seg = SEG_FREE
        slot.candidate = 0
        slot.next = <int32_t>self._free
        self._free = s
        Py_DECREF(<object>key)
        Py_DECREF(<object>value)
        return 0

    cdef int _regroup(self, Py_ssize_t s, tuple groups) except -1:
        # Slot `s` leaves its groups and joins `groups` (all or none); with
        # charge_overhead, the records of groups created or emptied are charged.
        cdef Py_ssize_t before = self._groups._charge
        self._groups.leave(s)
        try:
            if groups:
                self._groups.join(s, groups)
        finally:
            if self._charge_overhead:
                self._bytes += self._groups._charge - before
        return 0

    cdef int _drop(self, Py_ssize_t s, double now, bint refused) except -1:
        if now >= self._slots[s].expires:
            self._expirations += 1
        elif refused:
            self._refused += 1
        else:
            self._evictions += 1
        return self._remove(s)

    cdef int _enforce_lru(self, double now) except -1:
        while (self._count > self._max_entries or self._bytes > self._max_bytes) and (
            self._slots[SEG_WINDOW].prev != SEG_WINDOW
        ):
            self._drop(self._slots[SEG_WINDOW].prev, now, False)
        return 0

    cdef Py_ssize_t _victim(self, int seg, Py_ssize_t skip) noexcept:
        cdef Py_ssize_t s = self._slots[seg].prev
        if s != seg and s == skip:
            s = self._slots[s].prev
        if s == seg or self._slots[s].candidate:
            return -1
        return s

    cdef int _enforce_tinylfu(self, double now, Py_ssize_t skip) except -1:
        cdef Py_ssize_t cand = -1
        cdef Py_ssize_t c, v, nxt
        cdef Slot* slots
        # Window overflow: oldest first, to the probation MRU end, as candidates.
        while self._seg_n[SEG_WINDOW] > 0 and (
            self._seg_n[SEG_WINDOW] > self._window_n or self._seg_b[SEG_WINDOW] > self._window_b
        ):
            c = self._slots[SEG_WINDOW].prev
            self._unlink(c)
            self._link(c, SEG_PROBATION)
            self._slots[c].candidate = 1
            if cand < 0:
                cand = c
        while self._count > self._max_entries or self._bytes > self._max_bytes:
            v = self._victim(SEG_PROBATION, skip)
            if v < 0:
                v = self._victim(SEG_PROTECTED, skip)
            if v < 0:
                v = self._victim(SEG_WINDOW, skip)
            if cand < 0:
                if v < 0:
                    break
                self._drop(v, now, False)
                continue
            slots = self._slots
            if v >= 0 and now < slots[cand].expires:
                if now >= slots[v].expires or (
                    self._sketch.frequency(<uint64_t>slots[cand].hash)
                    > self._sketch.frequency(<uint64_t>slots[v].hash)
                ):
                    self._drop(v, now, False)
                    continue
            # The candidate goes: expired, lost, or nothing else left to evict.
            c = cand
            nxt = slots[c].prev
            cand = -1 if nxt == SEG_PROBATION or not slots[nxt].candidate else nxt
            self._drop(c, now, v >= 0)
        nxt = self._slots[SEG_PROBATION].next
        while nxt != SEG_PROBATION and self._slots[nxt].candidate:
            self._slots[nxt].candidate = 0
            nxt = self._slots[nxt].next
        return 0

    # -- reads ----------------------------------------------------------------------------

    cdef Py_ssize_t _find(self, object key) except -2:
        if not PyUnicode_Check(<PyObject*>key):
            return -1
        return index_find(self._index, self._mask, self._slots, <PyObject*>key, cg_str_hash(<PyObject*>key))

    cdef Py_ssize_t _lookup(self, object key) except -2:
        # The hot path: the slot of a fresh hit, or -1 for a miss.
        cdef Py_hash_t h
        cdef Py_ssize_t s
        cdef Slot* slot
        cdef Slot* slots
        if not PyUnicode_Check(<PyObject*>key):
            self._misses += 1
            return -1
        h = cg_str_hash(<PyObject*>key)
        if self._tinylfu:
            freq_record(self._sketch, <uint64_t>h)
        s = index_find(self._index, self._mask, self._slots, <PyObject*>key, h)
        if s < 0:
            self._misses += 1
            return -1
        slot = &self._slots[s]
        if self._clock is None and cg_clock(CLOCK_MONOTONIC_COARSE) + _PRECISE_WINDOW < slot.expires:
            pass  # fresh, proven by the cheap clock: the common case
        elif not self._fresh(s):
            self._expirations += 1
            self._misses += 1
            self._remove(s)
            return -1
        slot = &self._slots[s]  # the test clock ran Python code: reload
        slot.hits += 1
        self._hits += 1
        if self._tinylfu:
            self._touch(s)
        elif slot.prev != SEG_WINDOW:
            slots = self._slots
            slots[slot.prev].next = slot.next
            slots[slot.next].prev = slot.prev
            slot.next = slots[SEG_WINDOW].next
            slot.prev = SEG_WINDOW
            slots[slot.next].prev = <int32_t>s
            slots[SEG_WINDOW].next = <int32_t>s
        return s

    def __getitem__(self, key):
        """The value for `key`; KeyError when absent or expired (counts a hit or a miss)."""
        cdef Py_ssize_t s = self._lookup(key)
        if s < 0:
            raise KeyError(key)
        return <object>self._slots[s].value

    def get(self, key):
        """The value for `key`, or None when absent or expired (counts a hit or a miss)."""
        cdef Py_ssize_t s = self._lookup(key)
        if s < 0:
            return None
        return <object>self._slots[s].value

    def __contains__(self, key):
        """Is a fresh entry stored? Counts nothing and does not touch recency."""
        cdef Py_ssize_t s = self._find(key)
        return s >= 0 and self._fresh(s)

    def expires_in(self, key):
        """Seconds until `key` expires, or None when absent or expired. Counts nothing."""
        cdef Py_ssize_t s = self._find(key)
        cdef double left
        if s < 0:
            return None
        left = self._slots[s].expires - self._exact_now()
        return left if left > 0 else None

    def __len__(self):
        """Entries stored, including expired ones not reclaimed yet."""
        return self._count

    # -- writes ---------------------------------------------------------------------------

    def set(self, str key, object value, Py_ssize_t size, double ttl, tuple groups=()):
        """Store `value` for `ttl` seconds (> 0), charging `size` bytes; replaces `key`.

        `groups` (str names; a repeated name counts once) are the groups the entry belongs
        to from now on, for delete_group(); a replaced entry leaves its old groups.
        Returns whether `key` is cached afterwards: False when `size` exceeds max_bytes
        (any old entry is removed, so a stale value is never left behind) or when TinyLFU
        refused the new entry at once. Evicts per policy until both bounds hold.
        """
        cdef Py_hash_t h
        cdef Py_ssize_t s
        cdef Slot* slot
        cdef PyObject* old
        cdef double now
        if size < 0:
            raise ValueError("size must be >= 0")
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        check_names(groups)
        if self._charge_overhead:
            size += _ENTRY_OVERHEAD + _MEMBERSHIP_OVERHEAD * distinct_names(groups)
        if self._cap > _FIRST_CAP + FIRST_SLOT and 2 * self._count < self._cap - FIRST_SLOT:
            self._compact()
        now = self._now()
        h = cg_str_hash(<PyObject*>key)
        s = index_find(self._index, self._mask, self._slots, <PyObject*>key, h)
        if size > self._max_bytes:
            self._refused += 1
            if s >= 0:
                self._remove(s)
            return False
        if s >= 0:
            slot = &self._slots[s]
            self._bytes += size - slot.size
            self._seg_b[slot.seg] += size - slot.size
            slot.size = size
            slot.expires = now + ttl
            self._touch(s)
            if not self._groups.same(s, groups):
                try:
                    self._regroup(s, groups)
                except BaseException:
                    self._remove(s)  # never cached with fewer groups than it was given
                    raise
            slot = &self._slots[s]
            old = slot.value
            Py_INCREF(value)
            slot.value = <PyObject*>value
            Py_DECREF(<object>old)
        else:
            if 2 * (self._count + 1) > <Py_ssize_t>self._mask + 1:
                self._rehash(2 * (<Py_ssize_t>self._mask + 1))  # at most half full
            self._order._insert(<PyObject*>key)
            try:
                s = self._new_slot()
            except BaseException:
                self._order._remove(<PyObject*>key)
                raise
            slot = &self._slots[s]
            Py_INCREF(key)
            Py_INCREF(value)
            slot.hash = h
            slot.key = <PyObject*>key
            slot.value = <PyObject*>value
            slot.size = size
            slot.expires = now + ttl
            slot.hits = 0
            slot.candidate = 0
            index_insert(self._index, self._mask, h, s)
            self._link(s, SEG_WINDOW)
            self._count += 1
            self._bytes += size
            if groups:
                try:
                    self._regroup(s, groups)
                except BaseException:
                    self._remove(s)
                    raise
        if self._tinylfu:
            self._enforce_tinylfu(now, s)
        else:
            self._enforce_lru(now)
        return self._slots[s].seg != SEG_FREE  # values must not re-enter: s is still ours

    def delete(self, key):
        """Remove `key`; True when an entry (even an expired one) was stored."""
        cdef Py_ssize_t s = self._find(key)
        if s < 0:
            return False
        self._remove(s)
        return True

    def delete_prefix(self, str prefix):
        """Remove every key starting with `prefix` (expired or not); returns how many.

        Cost: O(log n + removed), through the key order. Counts nothing.
        """
        cdef list keys = self._order._take_prefix(<PyObject*>prefix)
        cdef list dead = []  # values are released once every structure is consistent
        cdef Py_ssize_t s, n = 0
        for k in keys:
            s = self._find(k)
            if s >= 0:
                dead.append(<object>self._slots[s].value)
                self._unstore(s)
                n += 1
        return n

    def delete_group(self, str name):
        """Remove every entry (expired or not) in group `name`; returns how many.

        Cost: O(removed x log n) (each leaves the key order), whatever the cache holds.
        Counts nothing.
        """
        cdef list keys = self._groups.keys_of(<PyObject*>name, self._slots)
        cdef list dead = []
        cdef Py_ssize_t s, n = 0
        for k in keys:
            s = self._find(k)
            if s >= 0:
                dead.append(<object>self._slots[s].value)
                self._remove(s)
                n += 1
        return n

    def group_size(self, str name):
        """Entries in group `name`, expired ones not reclaimed yet included; O(1)."""
        return self._groups.size(<PyObject*>name)

    def purge_expired(self):
        """Remove every expired entry (counted as expirations); O(n). Returns how many."""
        cdef double now = self._exact_now()
        cdef list doomed = [
            <object>self._slots[s].key
            for s in self._live_slots()
            if now >= self._slots[s].expires
        ]
        cdef Py_ssize_t s
        for k in doomed:
            s = self._find(k)
            if s >= 0:
                self._expirations += 1
                self._remove(s)
        return len(doomed)

    def clear(self):
        """Remove every entry. Counters and TinyLFU's frequency history are kept."""
        cdef Slot* old = self._slots
        cdef Py_ssize_t used = self._used
        cdef Py_ssize_t s
        cdef KeyOrder order = self._order  # released, with its key references, on return
        cdef GroupIndex groups = self._groups
        self._order = KeyOrder()
        self._groups = GroupIndex()
        PyMem_Free(self._index)
        self._slots = NULL
        self._index = NULL
        try:
            self._allocate(min(_FIRST_CAP, self._max_entries + 1) + FIRST_SLOT)
        finally:
            for s in range(FIRST_SLOT, used):
                if old[s].key != NULL:
                    Py_DECREF(<object>old[s].key)
                    Py_DECREF(<object>old[s].value)
            PyMem_Free(old)

    # -- introspection --------------------------------------------------------------------

    @property
    def nbytes(self):
        return self._bytes

    @property
    def max_entries(self):
        return self._max_entries

    @property
    def max_bytes(self):
        return self._max_bytes

    @property
    def admission(self):
        return "tinylfu" if self._tinylfu else "lru"

    @property
    def charge_overhead(self):
        return self._charge_overhead

    def stats(self):
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expirations": self._expirations,
            "admissions_refused": self._refused,
            "entries": self._count,
            "bytes": self._bytes,
            "max_entries": self._max_entries,
            "max_bytes": self._max_bytes,
        }

    def hottest(self, Py_ssize_t n):
        """Up to `n` fresh keys with the most hits (per-entry counts), most first; O(entries).

        Keys never hit are left out; ties are ordered by key.
        """
        cdef double now = self._exact_now()
        if n <= 0:
            return []
        hot = [
            (<object>self._slots[s].key, self._slots[s].hits)
            for s in self._live_slots()
            if self._slots[s].hits > 0 and now < self._slots[s].expires
        ]
        return heapq.nsmallest(n, hot, key=_hot_order)

    def items(self):
        """Every fresh entry as (key, value), in no particular order; O(entries). Counts
        nothing and does not touch recency (for invalidation scans, not the request path)."""
        cdef double now = self._exact_now()
        return [
            (<object>self._slots[s].key, <object>self._slots[s].value)
            for s in self._live_slots()
            if now < self._slots[s].expires
        ]

    def _check_indexes(self):
        """Raise AssertionError unless the key order and the group index agree with the
        entries (O(n); tests)."""
        cdef list keys = self._order.keys()
        if len(keys) != self._count:
            raise AssertionError(f"{len(keys)} keys in order, {self._count} entries")
        for k in keys:
            if self._find(k) < 0:
                raise AssertionError(f"{k!r} is in the order but not in the cache")
        self._groups._check(self._slots, self._used)

    def _footprint(self):
        """Bytes the L1's own structures have allocated, by structure (the entries'
        keys and values, group names and the TinyLFU sketch aside; tests, benchmarks)."""
        return {
            "slots": self._cap * <Py_ssize_t>sizeof(Slot),
            "index": (<Py_ssize_t>self._mask + 1) * <Py_ssize_t>sizeof(uint64_t),
            "key_order": self._order._footprint(),
            "groups": self._groups._footprint(),
        }

    def segments(self):
        """Entry counts per list: {'lru'} or {'window', 'probation', 'protected'} (tests)."""
        if not self._tinylfu:
            return {"lru": self._seg_n[0]}
        return {
            "window": self._seg_n[SEG_WINDOW],
            "probation": self._seg_n[SEG_PROBATION],
            "protected": self._seg_n[SEG_PROTECTED],
        }


def _hot_order(item):
    return (-item[1], item[0])
