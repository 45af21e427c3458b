# The L1's storage: one array of fixed-size slots plus an open-addressing index over it.
#
# Why not a dict of entry objects: a hit then touches the dict's index, the dict's entry,
# the entry object and (for the LRU move) its two neighbours. Here a hit touches one index
# word and one 64-byte slot (plus the neighbours), and a set allocates no Python object.
#
# Index words: 0 = empty, else (low 32 bits of the key's hash) << 32 | slot number. Slot
# numbers start at 3 (slots 0-2 are list heads), so a used word is never 0. Linear
# probing from (hash & mask); deletion shifts later words back, so there are no
# tombstones. The index is kept at most half full.

from cpython.object cimport PyObject
from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t, uint64_t

from cachegw_native.sketch cimport CG_U32_MAX


cdef extern from *:
    """
    #include <string.h>
    /* Equality of two str objects (both known to be str), without a Python call. */
    static inline int cg_str_eq(PyObject *a, PyObject *b) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(a);
        if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b))
            return 0;
        return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
    }
    /* A str caches its hash; read it the way dict does instead of calling tp_hash. */
    static inline Py_hash_t cg_str_hash(PyObject *s) {
        Py_hash_t h = ((PyASCIIObject *)s)->hash;
        return h != -1 ? h : PyObject_Hash(s);
    }
    /* What an allocation of n bytes takes: pymalloc's 16-byte size classes up to 512
       bytes, else a glibc malloc chunk (8 bytes of header, 16-byte aligned), and from
       128 KiB (malloc's mmap threshold) whole pages. */
    static inline Py_ssize_t cg_allocated(Py_ssize_t n) {
        if (n <= 512)
            return (n + 15) & ~(Py_ssize_t)15;
        if (n + 16 >= 128 * 1024)
            return (n + 16 + 4095) & ~(Py_ssize_t)4095;
        return (n + 8 + 15) & ~(Py_ssize_t)15;
    }
    /* A str object's size from its length and kind alone (sys.getsizeof of a compact
       str without a cached UTF-8 copy). */
    static inline Py_ssize_t cg_str_size(PyObject *s) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(s);
        if (PyUnicode_IS_COMPACT_ASCII(s))
            return (Py_ssize_t)sizeof(PyASCIIObject) + n + 1;
        return (Py_ssize_t)sizeof(PyCompactUnicodeObject) + (n + 1) * PyUnicode_KIND(s);
    }
    """
    int cg_str_eq(PyObject* a, PyObject* b) noexcept nogil
    Py_hash_t cg_str_hash(PyObject* s) except? -1
    Py_ssize_t cg_allocated(Py_ssize_t n) noexcept nogil
    Py_ssize_t cg_str_size(PyObject* s) noexcept nogil


cdef struct Slot:
    # 64 bytes: everything a hit reads or writes sits in one cache-line-sized block.
    Py_hash_t hash
    PyObject* key         # owned; NULL while the slot is free
    PyObject* value       # owned
    double expires
    int32_t prev          # toward the most recent end; list heads are slots 0-2
    int32_t next          # toward the least recent end; chains free slots too
    int64_t hits
    Py_ssize_t size
    int8_t seg            # which list; -1 when free
    int8_t candidate      # moved out of the TinyLFU window during the current set()


cdef inline Py_ssize_t index_find(
    const uint64_t* index, uint64_t mask, const Slot* slots, PyObject* key, Py_hash_t h
) noexcept:
    # The slot holding `key` (a str), or -1.
    cdef uint64_t pos = (<uint64_t>h) & mask
    cdef uint64_t frag = <uint32_t>(<uint64_t>h)
    cdef uint64_t word
    cdef Py_ssize_t s
    while True:
        word = index[pos]
        if word == 0:
            return -1
        if (word >> 32) == frag:
            s = <Py_ssize_t>(word & CG_U32_MAX)
            if slots[s].key == key or cg_str_eq(slots[s].key, key):
                return s
        pos = (pos + 1) & mask


cdef inline void index_insert(uint64_t* index, uint64_t mask, Py_hash_t h, Py_ssize_t s) noexcept:
    # Add slot `s`, whose key is known to be absent.
    cdef uint64_t pos = (<uint64_t>h) & mask
    while index[pos] != 0:
        pos = (pos + 1) & mask
    index[pos] = ((<uint64_t><uint32_t>(<uint64_t>h)) << 32) | <uint64_t>s


cdef inline void index_delete(uint64_t* index, uint64_t mask, Py_hash_t h, Py_ssize_t s) noexcept:
    # Remove slot `s`'s word, shifting back the words that probed past it.
    cdef uint64_t hole = (<uint64_t>h) & mask
    cdef uint64_t pos, home, word
    while (index[hole] & CG_U32_MAX) != <uint64_t>s:
        hole = (hole + 1) & mask
    index[hole] = 0
    pos = hole
    while True:
        pos = (pos + 1) & mask
        word = index[pos]
        if word == 0:
            return
        home = (word >> 32) & mask
        # The word may fill the hole unless its home lies cyclically in (hole, pos].
        if ((pos - home) & mask) >= ((pos - hole) & mask):
            index[hole] = word
            index[pos] = 0
            hole = pos
