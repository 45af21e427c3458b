# The L1's secondary indexes (l1index.pyx): keys in order (delete_prefix) and group
# memberships (delete_group). Both are plain C arrays; neither calls back into Python.
cimport cython
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint64_t

from cachegw_native.table cimport Slot, cg_str_eq


@cython.final
cdef class KeyOrder:
    # Every key, sorted by code point, in chunks of at most `_cap` owned references (the
    # layout of sortedcontainers.SortedList, without a Python call per comparison).
    cdef PyObject*** _chunks      # _n arrays of _cap pointers; none is empty
    cdef Py_ssize_t* _lens        # keys in each chunk
    cdef Py_ssize_t _n            # chunks in use
    cdef Py_ssize_t _room         # chunk table capacity
    cdef Py_ssize_t _cap          # keys per chunk at most; a full chunk splits in two
    cdef Py_ssize_t _len

    cdef Py_ssize_t _seek(self, PyObject* key, Py_ssize_t* pos) noexcept
    cdef int _open(self, Py_ssize_t at) except -1
    cdef void _close(self, Py_ssize_t lo, Py_ssize_t hi) noexcept
    cdef void _settle(self, Py_ssize_t c) noexcept
    cdef int _insert(self, PyObject* key) except -1
    cdef int _remove(self, PyObject* key) except -1
    cdef list _take_prefix(self, PyObject* prefix)
    cdef int _check(self) except -1
    cdef Py_ssize_t _footprint(self) noexcept


cdef struct Group:
    PyObject* name         # owned; NULL while the record is free
    Py_hash_t hash
    Py_ssize_t count       # members
    int32_t head           # first member node, 0 = none; free records chain through it


cdef struct Member:
    # One slot's membership of one group: 20 bytes.
    int32_t slot
    int32_t group
    int32_t prev           # neighbours in the group's list; 0 = none
    int32_t next
    int32_t sibling        # the slot's next membership; free nodes chain through it


@cython.final
cdef class GroupIndex:
    # Group name -> doubly linked list of member nodes, and slot -> chain of its nodes, so
    # that joining, leaving (any way out of the cache) and listing a group cost
    # O(memberships involved). Record and node 0 are never used: 0 means "none".
    cdef Group* _groups
    cdef Py_ssize_t _groups_cap
    cdef Py_ssize_t _groups_used  # high-water mark
    cdef int32_t _free_group
    cdef Py_ssize_t _ngroups      # groups with members
    cdef uint64_t* _index         # open addressing over names, as in table.pxd
    cdef uint64_t _mask
    cdef Member* _members
    cdef Py_ssize_t _members_cap
    cdef Py_ssize_t _members_used
    cdef int32_t _free_member
    cdef Py_ssize_t _nmembers
    cdef int32_t* _first          # per slot number: its first member node, 0 = none
    cdef Py_ssize_t _first_cap
    cdef Py_ssize_t _charge       # GROUP_OVERHEAD + the name's allocation, per group

    cdef int32_t _find(self, PyObject* name, Py_hash_t h) noexcept
    cdef int _reserve(self, Py_ssize_t s, Py_ssize_t k) except -1
    cdef int join(self, Py_ssize_t s, tuple names) except -1
    cdef void leave(self, Py_ssize_t s) noexcept
    cdef bint same(self, Py_ssize_t s, tuple names) noexcept
    cdef Py_ssize_t size(self, PyObject* name) except -1
    cdef list keys_of(self, PyObject* name, const Slot* slots)
    cdef GroupIndex renumbered(self, const int32_t* where, Py_ssize_t used)
    cdef Py_ssize_t _footprint(self) noexcept
    cdef int _check(self, const Slot* slots, Py_ssize_t used) except -1


cdef inline int check_names(tuple names) except -1:
    # Group names must be str; checked before a set() changes anything.
    cdef object name
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"group names must be str, not {type(name).__name__}")
    return 0


cdef inline Py_ssize_t distinct_names(tuple names) noexcept:
    # How many groups `names` (str, checked) makes an entry a member of: a repeated name
    # counts once. O(k^2) over a handful of names.
    cdef Py_ssize_t k = PyTuple_GET_SIZE(names), i, j, n = 0
    cdef PyObject* a
    cdef PyObject* b
    for i in range(k):
        a = PyTuple_GET_ITEM(names, i)
        for j in range(i):
            b = PyTuple_GET_ITEM(names, j)
            if a == b or cg_str_eq(a, b):
                break
        else:
            n += 1
    return n
