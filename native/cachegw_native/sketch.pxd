# Count-min sketches shared by the L1's TinyLFU admission and the hot-key tracker.
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from *:
    """
    /* Kirsch-Mitzenmacher: one 64-bit mix of the key's hash yields every row's index. */
    #define CG_U32_MAX 0xFFFFFFFFULL
    static inline uint64_t cg_fmix64(uint64_t x) {
        x ^= x >> 33; x *= 0xff51afd7ed558ccdULL;
        x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
        x ^= x >> 33; return x;
    }
    """
    uint64_t cg_fmix64(uint64_t x) noexcept nogil
    # Typed so that Cython does not turn a literal above C int range into a Python int.
    const uint64_t CG_U32_MAX


cdef class FrequencySketch:
    # TinyLFU's popularity estimate: depth 4, 4-bit saturating counters (one byte each),
    # all counters halved after `sample_size` additions so that old popularity fades.
    cdef uint8_t* _table
    cdef uint64_t _mask
    cdef readonly Py_ssize_t width
    cdef readonly Py_ssize_t sample_size
    cdef readonly Py_ssize_t additions
    cdef readonly Py_ssize_t resets

    cdef void record(self, uint64_t h) noexcept
    cdef int frequency(self, uint64_t h) noexcept
    cdef void _halve(self) noexcept


cdef inline void freq_record(FrequencySketch sk, uint64_t h) noexcept:
    # FrequencySketch.record, inlined into the L1's read path (no call through the vtable).
    cdef uint64_t x = cg_fmix64(h)
    cdef uint64_t h1 = x & CG_U32_MAX
    cdef uint64_t h2 = (x >> 32) | 1
    cdef uint8_t* row = sk._table
    cdef uint64_t i
    cdef uint8_t* c
    for i in range(4):
        c = &row[<uint64_t>sk.width * i + ((h1 + i * h2) & sk._mask)]
        if c[0] < 15:
            c[0] += 1
    sk.additions += 1
    if sk.additions >= sk.sample_size:
        sk._halve()


cdef class CountMinSketch:
    # Hot-key counting: 32-bit saturating counters, conservative update, optional decay.
    cdef uint32_t* _table
    cdef uint64_t _mask
    cdef readonly Py_ssize_t width
    cdef readonly Py_ssize_t depth

    cdef uint32_t add_hash(self, uint64_t h, uint32_t count) noexcept
    cdef uint32_t estimate_hash(self, uint64_t h) noexcept
