# cython: language_level=3
"""Count-min sketches: `FrequencySketch` (TinyLFU admission) and `CountMinSketch` (hot keys).

Both index row i of a key at ``(h1 + i * h2) & (width - 1)`` where h1/h2 are the low/high
halves of ``fmix64(hash(key))`` (h2 forced odd), so one hash feeds every row. The width is
the next power of two. Single-threaded like the rest of the package: no locking.
"""

from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset

cdef enum:
    FREQ_DEPTH = 4
    FREQ_MAX = 15


cdef Py_ssize_t _pow2_at_least(Py_ssize_t n) noexcept:
    cdef Py_ssize_t w = 1
    while w < n:
        w <<= 1
    return w


cdef inline uint64_t _key_hash(object key) except? 0:
    return <uint64_t>hash(key)


cdef class FrequencySketch:
    """4-bit count-min sketch of recent popularity, for TinyLFU admission.

    ``capacity`` is the cache's entry bound. Each row is the next power of two at least
    ``4 * capacity`` wide (as many counters as Caffeine's sketch, one byte each), and every
    ``10 * capacity`` additions all counters are halved.
    """

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.width = _pow2_at_least(max(4 * capacity, 16))
        self._mask = <uint64_t>(self.width - 1)
        self.sample_size = 10 * capacity
        self._table = <uint8_t*>PyMem_Calloc(FREQ_DEPTH * self.width, 1)
        if self._table == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._table)

    cdef void record(self, uint64_t h) noexcept:
        freq_record(self, h)  # the body lives in sketch.pxd so that the L1 inlines it

    cdef int frequency(self, uint64_t h) noexcept:
        cdef uint64_t x = cg_fmix64(h)
        cdef uint64_t h1 = x & CG_U32_MAX
        cdef uint64_t h2 = (x >> 32) | 1
        cdef Py_ssize_t i
        cdef int f = FREQ_MAX
        cdef int c
        for i in range(FREQ_DEPTH):
            c = self._table[i * self.width + <Py_ssize_t>((h1 + <uint64_t>i * h2) & self._mask)]
            if c < f:
                f = c
        return f

    cdef void _halve(self) noexcept:
        cdef Py_ssize_t i
        for i in range(FREQ_DEPTH * self.width):
            self._table[i] >>= 1
        self.additions //= 2
        self.resets += 1

    # Python face, for tests and diagnostics.
    def increment(self, key: object) -> None:
        self.record(_key_hash(key))

    def estimate(self, key: object) -> int:
        return self.frequency(_key_hash(key))


cdef class CountMinSketch:
    """Count-min sketch with 32-bit saturating counters and conservative update.

    Conservative update raises only the rows at the current minimum, which keeps the
    over-estimate of heavy hitters small; estimates never under-count.
    """

    def __cinit__(self, Py_ssize_t width=4096, Py_ssize_t depth=4):
        if width < 1 or depth < 1 or depth > 16:
            raise ValueError("width must be >= 1 and depth in 1..16")
        self.width = _pow2_at_least(width)
        self.depth = depth
        self._mask = <uint64_t>(self.width - 1)
        self._table = <uint32_t*>PyMem_Calloc(depth * self.width, sizeof(uint32_t))
        if self._table == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._table)

    cdef uint32_t add_hash(self, uint64_t h, uint32_t count) noexcept:
        cdef uint64_t x = cg_fmix64(h)
        cdef uint64_t h1 = x & CG_U32_MAX
        cdef uint64_t h2 = (x >> 32) | 1
        cdef uint32_t* rows[16]
        cdef Py_ssize_t i
        cdef uint32_t low = <uint32_t>CG_U32_MAX
        cdef uint64_t target
        for i in range(self.depth):
            rows[i] = &self._table[i * self.width + <Py_ssize_t>((h1 + <uint64_t>i * h2) & self._mask)]
            if rows[i][0] < low:
                low = rows[i][0]
        target = <uint64_t>low + count
        if target > CG_U32_MAX:
            target = CG_U32_MAX
        for i in range(self.depth):
            if rows[i][0] < target:
                rows[i][0] = <uint32_t>target
        return <uint32_t>target

    cdef uint32_t estimate_hash(self, uint64_t h) noexcept:
        cdef uint64_t x = cg_fmix64(h)
        cdef uint64_t h1 = x & CG_U32_MAX
        cdef uint64_t h2 = (x >> 32) | 1
        cdef Py_ssize_t i
        cdef uint32_t low = <uint32_t>CG_U32_MAX
        cdef uint32_t c
        for i in range(self.depth):
            c = self._table[i * self.width + <Py_ssize_t>((h1 + <uint64_t>i * h2) & self._mask)]
            if c < low:
                low = c
        return low

    def add(self, key: object, count: int = 1) -> int:
        """Count `key` `count` more times; returns its new estimate."""
        if count < 0:
            raise ValueError("count must be >= 0")
        return self.add_hash(_key_hash(key), <uint32_t>min(<uint64_t>count, CG_U32_MAX))

    def estimate(self, key: object) -> int:
        return self.estimate_hash(_key_hash(key))

    def decay(self) -> None:
        """Halve every counter, so that yesterday's heavy hitters fade."""
        cdef Py_ssize_t i
        for i in range(self.depth * self.width):
            self._table[i] >>= 1

    def clear(self) -> None:
        memset(self._table, 0, self.depth * self.width * sizeof(uint32_t))
