# cython: language_level=3, always_allow_keywords=False
"""The L1's secondary indexes, so that broad invalidations cost what they remove.

KeyOrder: every key of the cache in code-point order (str's ``<``), in a list of sorted
chunks of at most 512 owned references: the layout of sortedcontainers.SortedList, with
the comparisons done in C. Insert and remove cost O(log n) comparisons plus a memmove of
at most one chunk; the keys starting with a prefix are contiguous, so taking them costs
O(log n + matches). A full chunk splits in halves; a chunk left empty is freed and one
left small merges with a neighbour.

GroupIndex: group name -> doubly linked list of member nodes, and slot number -> chain
of that slot's nodes, in C arrays with free lists. Joining costs one name lookup per
group (an open-addressing table like the L1's own, table.pxd); leaving costs O(the
slot's memberships) with no lookup; a group with no members left is forgotten at once.

Both are owned by an L1Cache, single-threaded like it, and never call back into Python
(beyond releasing str references). The Python-visible methods exist for the tests.
"""

from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memcpy, memmove, memset

from cachegw_native.sketch cimport CG_U32_MAX
from cachegw_native.table cimport (
    Slot,
    cg_allocated,
    cg_str_eq,
    cg_str_hash,
    cg_str_size,
    index_delete,
    index_insert,
)

cdef extern from *:
    """
    #include <string.h>
    /* -1, 0 or 1 as a < b, a == b, a > b by code points, like str's < (both are str). */
    static inline int cg_str_cmp(PyObject *a, PyObject *b) {
        Py_ssize_t na = PyUnicode_GET_LENGTH(a), nb = PyUnicode_GET_LENGTH(b);
        Py_ssize_t n = na < nb ? na : nb, i;
        int ka = PyUnicode_KIND(a), kb = PyUnicode_KIND(b);
        const void *da = PyUnicode_DATA(a), *db = PyUnicode_DATA(b);
        if (a == b)
            return 0;
        if (ka == PyUnicode_1BYTE_KIND && kb == PyUnicode_1BYTE_KIND) {
            int c = memcmp(da, db, (size_t)n);  /* unsigned bytes: Latin-1 code points */
            if (c != 0)
                return c < 0 ? -1 : 1;
        } else {
            for (i = 0; i < n; i++) {
                Py_UCS4 x = PyUnicode_READ(ka, da, i), y = PyUnicode_READ(kb, db, i);
                if (x != y)
                    return x < y ? -1 : 1;
            }
        }
        return (na > nb) - (na < nb);
    }
    /* s.startswith(prefix), both str. */
    static inline int cg_str_startswith(PyObject *s, PyObject *prefix) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(prefix), i;
        int ks = PyUnicode_KIND(s), kp = PyUnicode_KIND(prefix);
        const void *ds = PyUnicode_DATA(s), *dp = PyUnicode_DATA(prefix);
        if (n > PyUnicode_GET_LENGTH(s))
            return 0;
        if (ks == kp)
            return memcmp(ds, dp, (size_t)n * ks) == 0;
        for (i = 0; i < n; i++)
            if (PyUnicode_READ(ks, ds, i) != PyUnicode_READ(kp, dp, i))
                return 0;
        return 1;
    }
    """
    int cg_str_cmp(PyObject* a, PyObject* b) noexcept nogil
    int cg_str_startswith(PyObject* s, PyObject* prefix) noexcept nogil

cdef Py_ssize_t _CHUNK = 512
cdef Py_ssize_t _MAX_ID = 0x7FFFFFFF  # member nodes and group records are int32 numbers

# The memory of one group with members, besides its name string: its 32-byte record and
# its words in the name table (16-32 bytes per record), with the arrays' growth slack
# (25 %). Charged, with the name's allocation, by an L1Cache(charge_overhead=True).
GROUP_OVERHEAD = 64
cdef Py_ssize_t _GROUP_OVERHEAD = GROUP_OVERHEAD


cdef inline Py_ssize_t _grown(Py_ssize_t cap, Py_ssize_t need) noexcept:
    # Arrays grow by a quarter (at least to `need`), so that at most a fifth of what they
    # hold is slack: the L1 charges its memory per entry, and doubling would leave up to
    # half of it unaccounted for.
    return max(cap + cap // 4, need)


cdef class KeyOrder:
    """Sorted str keys in chunks of at most `chunk` (>= 4); see the module docstring."""

    def __cinit__(self, *args, **kwargs):
        self._cap = _CHUNK

    def __init__(self, Py_ssize_t chunk=_CHUNK):
        if chunk < 4:
            raise ValueError("chunk must be >= 4")
        if self._n:
            raise RuntimeError("KeyOrder.__init__ called on a non-empty order")
        self._cap = chunk

    def __dealloc__(self):
        cdef Py_ssize_t c, i
        for c in range(self._n):
            for i in range(self._lens[c]):
                Py_DECREF(<object>self._chunks[c][i])
            PyMem_Free(self._chunks[c])
        PyMem_Free(self._chunks)
        PyMem_Free(self._lens)
        self._chunks, self._lens, self._n = NULL, NULL, 0

    cdef Py_ssize_t _seek(self, PyObject* key, Py_ssize_t* pos) noexcept:
        # The first position holding a key >= `key`: chunk number, and *pos in it;
        # (_n, 0) when every key is smaller.
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        cdef PyObject** arr
        while lo < hi:
            mid = (lo + hi) >> 1
            if cg_str_cmp(self._chunks[mid][self._lens[mid] - 1], key) < 0:
                lo = mid + 1
            else:
                hi = mid
        pos[0] = 0
        if lo == self._n:
            return lo
        arr = self._chunks[lo]
        hi = self._lens[lo] - 1  # arr[hi] >= key
        while pos[0] < hi:
            mid = (pos[0] + hi) >> 1
            if cg_str_cmp(arr[mid], key) < 0:
                pos[0] = mid + 1
            else:
                hi = mid
        return lo

    cdef int _open(self, Py_ssize_t at) except -1:
        # An empty chunk at position `at`; the caller fills it before anything else runs.
        cdef PyObject** arr = <PyObject**>PyMem_Malloc(self._cap * sizeof(PyObject*))
        cdef PyObject*** chunks
        cdef Py_ssize_t* lens
        cdef Py_ssize_t room
        if arr == NULL:
            raise MemoryError()
        if self._n == self._room:
            room = max(8, 2 * self._room)
            chunks = <PyObject***>PyMem_Realloc(self._chunks, room * sizeof(PyObject**))
            if chunks == NULL:
                PyMem_Free(arr)
                raise MemoryError()
            self._chunks = chunks
            lens = <Py_ssize_t*>PyMem_Realloc(self._lens, room * sizeof(Py_ssize_t))
            if lens == NULL:
                PyMem_Free(arr)
                raise MemoryError()
            self._lens, self._room = lens, room
        memmove(&self._chunks[at + 1], &self._chunks[at], (self._n - at) * sizeof(PyObject**))
        memmove(&self._lens[at + 1], &self._lens[at], (self._n - at) * sizeof(Py_ssize_t))
        self._chunks[at] = arr
        self._lens[at] = 0
        self._n += 1
        return 0

    cdef void _close(self, Py_ssize_t lo, Py_ssize_t hi) noexcept:
        # Free the empty chunks among lo..hi (inclusive) and close the gaps.
        cdef Py_ssize_t w = lo, r
        for r in range(lo, hi + 1):
            if self._lens[r] == 0:
                PyMem_Free(self._chunks[r])
            else:
                self._chunks[w] = self._chunks[r]
                self._lens[w] = self._lens[r]
                w += 1
        if w == hi + 1:
            return
        memmove(&self._chunks[w], &self._chunks[hi + 1], (self._n - hi - 1) * sizeof(PyObject**))
        memmove(&self._lens[w], &self._lens[hi + 1], (self._n - hi - 1) * sizeof(Py_ssize_t))
        self._n -= hi + 1 - w

    cdef void _settle(self, Py_ssize_t c) noexcept:
        # After removals from chunk `c`: free it if empty, else merge it with a neighbour
        # when both fit in half a chunk (so chunks stay few, and splits rare).
        cdef Py_ssize_t a
        if self._lens[c] == 0:
            self._close(c, c)
            return
        if c + 1 < self._n and self._lens[c] + self._lens[c + 1] <= self._cap // 2:
            a = c
        elif c > 0 and self._lens[c - 1] + self._lens[c] <= self._cap // 2:
            a = c - 1
        else:
            return
        memcpy(&self._chunks[a][self._lens[a]], self._chunks[a + 1],
               self._lens[a + 1] * sizeof(PyObject*))
        self._lens[a] += self._lens[a + 1]
        self._lens[a + 1] = 0
        self._close(a + 1, a + 1)

    cdef int _insert(self, PyObject* key) except -1:
        # Add `key` (a str); 1, or 0 when an equal key is already there.
        cdef Py_ssize_t p, n, half
        cdef Py_ssize_t c = self._seek(key, &p)
        cdef PyObject** arr
        if c < self._n and cg_str_cmp(self._chunks[c][p], key) == 0:
            return 0
        if c == self._n:
            if self._n == 0:
                self._open(0)
            else:
                c = self._n - 1
                p = self._lens[c]
        if self._lens[c] == self._cap and p == self._cap and c == self._n - 1:
            # Past the last key: a chunk of its own, so that keys added in rising order
            # leave full chunks behind rather than the halves of splits.
            self._open(c + 1)
            c += 1
            p = 0
        elif self._lens[c] == self._cap and p == 0 and c == 0:
            self._open(0)  # before the first key: likewise, for falling order
        elif self._lens[c] == self._cap:
            self._open(c + 1)
            half = self._cap // 2
            memcpy(self._chunks[c + 1], &self._chunks[c][half],
                   (self._cap - half) * sizeof(PyObject*))
            self._lens[c + 1] = self._cap - half
            self._lens[c] = half
            if p > half:
                c += 1
                p -= half
        arr = self._chunks[c]
        n = self._lens[c]
        memmove(&arr[p + 1], &arr[p], (n - p) * sizeof(PyObject*))
        Py_INCREF(<object>key)
        arr[p] = key
        self._lens[c] = n + 1
        self._len += 1
        return 1

    cdef int _remove(self, PyObject* key) except -1:
        # Drop `key` (a str); 1, or 0 when absent.
        cdef Py_ssize_t p
        cdef Py_ssize_t c = self._seek(key, &p)
        cdef PyObject** arr
        cdef PyObject* old
        if c == self._n:
            return 0
        arr = self._chunks[c]
        old = arr[p]
        if old != key and cg_str_cmp(old, key) != 0:
            return 0
        memmove(&arr[p], &arr[p + 1], (self._lens[c] - p - 1) * sizeof(PyObject*))
        self._lens[c] -= 1
        self._len -= 1
        self._settle(c)
        Py_DECREF(<object>old)
        return 1

    cdef list _take_prefix(self, PyObject* prefix):
        # Remove every key starting with `prefix` and return them, in order.
        cdef list out = []
        cdef Py_ssize_t p, q, j, n
        cdef Py_ssize_t c = self._seek(prefix, &p)
        cdef Py_ssize_t first = c
        cdef PyObject** arr
        while c < self._n:
            arr = self._chunks[c]
            n = self._lens[c]
            q = p
            while q < n and cg_str_startswith(arr[q], prefix):
                q += 1
            for j in range(p, q):
                out.append(<object>arr[j])
            for j in range(p, q):
                Py_DECREF(<object>arr[j])  # `out` holds them now
            memmove(&arr[p], &arr[q], (n - q) * sizeof(PyObject*))
            self._lens[c] = n - (q - p)
            self._len -= q - p
            if q < n:
                break
            c += 1
            p = 0
        if first < self._n:
            self._close(first, min(c, self._n - 1))
        if first < self._n:
            self._settle(first)
        return out

    cdef int _check(self) except -1:
        cdef Py_ssize_t c, i, total = 0
        cdef PyObject* prev = NULL
        for c in range(self._n):
            if not 1 <= self._lens[c] <= self._cap:
                raise AssertionError(f"chunk {c} holds {self._lens[c]} keys")
            total += self._lens[c]
            for i in range(self._lens[c]):
                if prev != NULL and cg_str_cmp(prev, self._chunks[c][i]) >= 0:
                    raise AssertionError(f"keys out of order at chunk {c}, position {i}")
                prev = self._chunks[c][i]
        if total != self._len:
            raise AssertionError(f"{total} keys in chunks, {self._len} counted")
        return 0

    cdef Py_ssize_t _footprint(self) noexcept:
        # Bytes allocated: the chunks and the chunk table.
        return self._n * self._cap * sizeof(PyObject*) + self._room * (
            sizeof(PyObject**) + sizeof(Py_ssize_t)
        )

    def __len__(self):
        return self._len

    def add(self, str key):
        """Insert `key`; False when it is already there."""
        return self._insert(<PyObject*>key) == 1

    def discard(self, str key):
        """Remove `key`; False when it was not there."""
        return self._remove(<PyObject*>key) == 1

    def take_prefix(self, str prefix):
        """Remove and return, in order, every key starting with `prefix`."""
        return self._take_prefix(<PyObject*>prefix)

    def keys(self):
        """Every key, in order (O(n); tests)."""
        self._check()
        return [<object>self._chunks[c][i] for c in range(self._n) for i in range(self._lens[c])]

    def chunk_sizes(self):
        """Keys per chunk, in order (tests)."""
        return [self._lens[c] for c in range(self._n)]


cdef class GroupIndex:
    """Group memberships of an L1Cache's slots; see the module docstring."""

    def __cinit__(self):
        self._groups_cap = 16
        self._groups = <Group*>PyMem_Calloc(self._groups_cap, sizeof(Group))
        self._mask = 63
        self._index = <uint64_t*>PyMem_Calloc(self._mask + 1, sizeof(uint64_t))
        self._members_cap = 16
        self._members = <Member*>PyMem_Calloc(self._members_cap, sizeof(Member))
        if self._groups == NULL or self._index == NULL or self._members == NULL:
            raise MemoryError()
        self._groups_used = 1
        self._members_used = 1

    def __dealloc__(self):
        cdef Py_ssize_t g
        if self._groups != NULL:
            for g in range(1, self._groups_used):
                if self._groups[g].name != NULL:
                    Py_DECREF(<object>self._groups[g].name)
        PyMem_Free(self._groups)
        PyMem_Free(self._index)
        PyMem_Free(self._members)
        PyMem_Free(self._first)
        self._groups, self._index, self._members, self._first = NULL, NULL, NULL, NULL

    cdef int32_t _find(self, PyObject* name, Py_hash_t h) noexcept:
        # The record of group `name` (a str), or 0.
        cdef uint64_t pos = (<uint64_t>h) & self._mask
        cdef uint64_t frag = (<uint64_t>h) & CG_U32_MAX
        cdef uint64_t word
        cdef int32_t g
        while True:
            word = self._index[pos]
            if word == 0:
                return 0
            if (word >> 32) == frag:
                g = <int32_t>(word & CG_U32_MAX)
                if self._groups[g].name == name or cg_str_eq(self._groups[g].name, name):
                    return g
            pos = (pos + 1) & self._mask

    cdef int _reserve(self, Py_ssize_t s, Py_ssize_t k) except -1:
        # Room for slot `s` and for `k` more nodes and records, so that join cannot fail
        # halfway.
        cdef Py_ssize_t cap, width, g
        cdef void* p
        cdef uint64_t* index
        if s >= self._first_cap:
            cap = _grown(self._first_cap, max(64, s + 1))
            p = PyMem_Realloc(self._first, cap * sizeof(int32_t))
            if p == NULL:
                raise MemoryError()
            self._first = <int32_t*>p
            memset(&self._first[self._first_cap], 0, (cap - self._first_cap) * sizeof(int32_t))
            self._first_cap = cap
        if self._members_used + k > self._members_cap:
            cap = _grown(self._members_cap, self._members_used + k)
            if cap > _MAX_ID:
                raise MemoryError("too many group memberships")
            p = PyMem_Realloc(self._members, cap * sizeof(Member))
            if p == NULL:
                raise MemoryError()
            self._members, self._members_cap = <Member*>p, cap
        if self._groups_used + k > self._groups_cap:
            cap = _grown(self._groups_cap, self._groups_used + k)
            if cap > _MAX_ID:
                raise MemoryError("too many groups")
            width = <Py_ssize_t>self._mask + 1
            while width < 2 * cap:
                width <<= 1
            index = <uint64_t*>PyMem_Calloc(width, sizeof(uint64_t))
            if index == NULL:
                raise MemoryError()
            p = PyMem_Realloc(self._groups, cap * sizeof(Group))
            if p == NULL:
                PyMem_Free(index)
                raise MemoryError()
            self._groups = <Group*>p
            memset(&self._groups[self._groups_cap], 0, (cap - self._groups_cap) * sizeof(Group))
            self._groups_cap = cap
            PyMem_Free(self._index)
            self._index, self._mask = index, <uint64_t>(width - 1)
            for g in range(1, self._groups_used):
                if self._groups[g].name != NULL:
                    index_insert(index, self._mask, self._groups[g].hash, g)
        return 0

    cdef int join(self, Py_ssize_t s, tuple names) except -1:
        # Make slot `s` (which has no memberships) a member of each group in `names`
        # (str, checked by the caller); a name given twice counts once. The slot's chain
        # lists its groups in the order of `names`.
        cdef Py_ssize_t k = PyTuple_GET_SIZE(names), i
        cdef PyObject* name
        cdef Py_hash_t h
        cdef int32_t g, m, head
        if k == 0:
            return 0
        for i in range(k):
            cg_str_hash(PyTuple_GET_ITEM(names, i))  # computes and caches, or raises
        self._reserve(s, k)
        for i in range(k - 1, -1, -1):
            name = PyTuple_GET_ITEM(names, i)
            h = cg_str_hash(name)
            g = self._find(name, h)
            if g == 0:
                g = self._free_group
                if g != 0:
                    self._free_group = self._groups[g].head
                else:
                    g = <int32_t>self._groups_used
                    self._groups_used += 1
                Py_INCREF(<object>name)
                self._groups[g].name = name
                self._groups[g].hash = h
                self._groups[g].count = 0
                self._groups[g].head = 0
                index_insert(self._index, self._mask, h, g)
                self._ngroups += 1
                self._charge += _GROUP_OVERHEAD + cg_allocated(cg_str_size(name))
            else:
                head = self._groups[g].head  # never 0: a group without members is gone
                if self._members[head].slot == s:
                    continue  # joined a moment ago: a repeated name
            m = self._free_member
            if m != 0:
                self._free_member = self._members[m].sibling
            else:
                m = <int32_t>self._members_used
                self._members_used += 1
            head = self._groups[g].head
            self._members[m].slot = <int32_t>s
            self._members[m].group = g
            self._members[m].prev = 0
            self._members[m].next = head
            if head != 0:
                self._members[head].prev = m
            self._groups[g].head = m
            self._groups[g].count += 1
            self._members[m].sibling = self._first[s]
            self._first[s] = m
            self._nmembers += 1
        return 0

    cdef void leave(self, Py_ssize_t s) noexcept:
        # Slot `s` leaves every group it belongs to; empty groups are forgotten.
        cdef int32_t m, nxt, g
        cdef Member* node
        cdef Group* grp
        cdef PyObject* name
        if s >= self._first_cap:
            return
        m = self._first[s]
        self._first[s] = 0
        while m != 0:
            node = &self._members[m]
            nxt = node.sibling
            g = node.group
            grp = &self._groups[g]
            if node.prev != 0:
                self._members[node.prev].next = node.next
            else:
                grp.head = node.next
            if node.next != 0:
                self._members[node.next].prev = node.prev
            grp.count -= 1
            if grp.count == 0:
                index_delete(self._index, self._mask, grp.hash, g)
                name = grp.name
                self._charge -= _GROUP_OVERHEAD + cg_allocated(cg_str_size(name))
                grp.name = NULL
                grp.head = self._free_group
                self._free_group = g
                self._ngroups -= 1
                Py_DECREF(<object>name)
            node.slot = 0
            node.group = 0
            node.sibling = self._free_member
            self._free_member = m
            self._nmembers -= 1
            m = nxt

    cdef bint same(self, Py_ssize_t s, tuple names) noexcept:
        # Does slot `s` belong to exactly `names`, in that order (str, no repeats)?
        cdef Py_ssize_t k = PyTuple_GET_SIZE(names), i
        cdef int32_t m = self._first[s] if s < self._first_cap else 0
        cdef PyObject* have
        cdef PyObject* want
        for i in range(k):
            if m == 0:
                return False
            have = self._groups[self._members[m].group].name
            want = PyTuple_GET_ITEM(names, i)
            if have != want and not cg_str_eq(have, want):
                return False
            m = self._members[m].sibling
        return m == 0

    cdef Py_ssize_t size(self, PyObject* name) except -1:
        cdef int32_t g = self._find(name, cg_str_hash(name))
        return self._groups[g].count if g != 0 else 0

    cdef list keys_of(self, PyObject* name, const Slot* slots):
        # The keys of the slots in group `name`, most recently joined first.
        cdef int32_t g = self._find(name, cg_str_hash(name))
        cdef int32_t m = self._groups[g].head if g != 0 else 0
        cdef list out = []
        while m != 0:
            out.append(<object>slots[self._members[m].slot].key)
            m = self._members[m].next
        return out

    cdef GroupIndex renumbered(self, const int32_t* where, Py_ssize_t used):
        # A new index with the same memberships, slot s becoming where[s] (for the slots
        # below `used` that have any), built compactly: the L1's compaction. Each slot's
        # chain keeps its order, so same() answers as before.
        cdef GroupIndex out = GroupIndex()
        cdef Py_ssize_t s
        cdef int32_t m
        cdef list names
        for s in range(min(used, self._first_cap)):
            m = self._first[s]
            if m == 0:
                continue
            names = []
            while m != 0:
                names.append(<object>self._groups[self._members[m].group].name)
                m = self._members[m].sibling
            out.join(where[s], tuple(names))
        return out

    cdef int _check(self, const Slot* slots, Py_ssize_t used) except -1:
        # Every list agrees with every chain, counts and the name table (tests).
        cdef Py_ssize_t g, s, n, total = 0, groups = 0, chained = 0, charge = 0
        cdef int32_t m, prev
        for g in range(1, self._groups_used):
            if self._groups[g].name == NULL:
                continue
            groups += 1
            charge += _GROUP_OVERHEAD + cg_allocated(cg_str_size(self._groups[g].name))
            if self._find(self._groups[g].name, self._groups[g].hash) != g:
                raise AssertionError(f"group {g} is not found by its name")
            n, prev, m = 0, 0, self._groups[g].head
            while m != 0:
                if self._members[m].group != g or self._members[m].prev != prev:
                    raise AssertionError(f"group {g}: node {m} is mislinked")
                if slots[self._members[m].slot].key == NULL:
                    raise AssertionError(f"group {g}: node {m} names a free slot")
                n += 1
                prev, m = m, self._members[m].next
            if n == 0 or n != self._groups[g].count:
                raise AssertionError(f"group {g}: {n} nodes, count {self._groups[g].count}")
            total += n
        for s in range(min(used, self._first_cap)):
            m = self._first[s]
            while m != 0:
                if self._members[m].slot != s:
                    raise AssertionError(f"slot {s}: node {m} belongs to another slot")
                chained += 1
                m = self._members[m].sibling
        if not (groups == self._ngroups and total == chained == self._nmembers):
            raise AssertionError(
                f"{groups} groups ({self._ngroups} counted), {total} listed members, "
                f"{chained} chained, {self._nmembers} counted"
            )
        if charge != self._charge:
            raise AssertionError(f"groups charged {self._charge} bytes, {charge} expected")
        return 0

    cdef Py_ssize_t _footprint(self) noexcept:
        # Bytes allocated: records, name table, member nodes, per-slot chain heads.
        return (
            self._groups_cap * sizeof(Group)
            + (<Py_ssize_t>self._mask + 1) * sizeof(uint64_t)
            + self._members_cap * sizeof(Member)
            + self._first_cap * sizeof(int32_t)
        )

    def __len__(self):
        """Groups with at least one member."""
        return self._ngroups

