cimport cython
from libc.stdint cimport uint64_t

from cachegw_native.l1index cimport GroupIndex, KeyOrder
from cachegw_native.sketch cimport FrequencySketch
from cachegw_native.table cimport Slot


cdef enum:
    SEG_FREE = -1
    SEG_WINDOW = 0       # the only list in LRU mode; each list's head is the slot of its number
    SEG_PROBATION = 1
    SEG_PROTECTED = 2
    FIRST_SLOT = 3


@cython.final
cdef class L1Cache:
    cdef Slot* _slots
    cdef Py_ssize_t _cap          # slots allocated, list heads included
    cdef Py_ssize_t _used         # slots ever handed out (high-water mark)
    cdef Py_ssize_t _free         # first free slot below _used, or -1
    cdef uint64_t* _index
    cdef uint64_t _mask
    cdef Py_ssize_t _seg_n[3]
    cdef Py_ssize_t _seg_b[3]
    cdef Py_ssize_t _count
    cdef Py_ssize_t _bytes
    cdef Py_ssize_t _max_entries
    cdef Py_ssize_t _max_bytes
    cdef bint _tinylfu
    cdef FrequencySketch _sketch
    cdef Py_ssize_t _window_n
    cdef Py_ssize_t _window_b
    cdef Py_ssize_t _protected_n
    cdef Py_ssize_t _protected_b
    cdef object _clock
    cdef unsigned long long _hits
    cdef unsigned long long _misses
    cdef unsigned long long _evictions
    cdef unsigned long long _expirations
    cdef unsigned long long _refused
    # Last, so that the fields a hit reads keep their offsets (and cache lines).
    cdef KeyOrder _order          # every key, sorted (delete_prefix)
    cdef GroupIndex _groups       # group memberships by slot (delete_group)
    cdef bint _charge_overhead    # entries and groups are also charged the L1's own memory

    cdef int _allocate(self, Py_ssize_t cap) except -1
    cdef int _grow(self) except -1
    cdef int _rehash(self, Py_ssize_t width) except -1
    cdef int _compact(self) except -1
    cdef int _regroup(self, Py_ssize_t s, tuple groups) except -1
    cdef Py_ssize_t _new_slot(self) except -1
    cdef double _now(self) except? -1.0
    cdef double _exact_now(self) except? -1.0
    cdef bint _fresh(self, Py_ssize_t s) except -1
    cdef Py_ssize_t _find(self, object key) except -2
    cdef Py_ssize_t _lookup(self, object key) except -2
    cdef void _link(self, Py_ssize_t s, int seg) noexcept
    cdef void _unlink(self, Py_ssize_t s) noexcept
    cdef void _touch(self, Py_ssize_t s) noexcept
    cdef int _remove(self, Py_ssize_t s) except -1
    cdef int _unstore(self, Py_ssize_t s) except -1
    cdef int _drop(self, Py_ssize_t s, double now, bint refused) except -1
    cdef int _enforce_lru(self, double now) except -1
    cdef int _enforce_tinylfu(self, double now, Py_ssize_t skip) except -1
    cdef Py_ssize_t _victim(self, int seg, Py_ssize_t skip) noexcept
    cdef list _live_slots(self)
