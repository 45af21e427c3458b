# cython: language_level=3
"""GetMany's L1 part, in C: the loop the gateway runs once per key of a batch.

`l1_results(l1, keys, now, hotkeys, tables)` looks every key up in `l1` and returns
(pieces, missing): five pieces of the encoded GetManyResponse per key, for one
`bytes.join`, and the positions of the keys L1 did not answer (their pieces are empty,
for the caller to fill). For a hit the pieces are the entry's result framing, its
encoded answer and a fixed-width TTL from three table lookups; the hit is counted in the
entry's class counters and in `hotkeys`.

It reads the gateway's L1 value layout, ``(answer, fresh_until, counters, framing)``
(cachegw_gateway.l1tier.L1Value), and the TTL tables of cachegw_gateway.wire; the
plain-Python model in tests/native/models.py is held to the same answers by property
tests. In Python the same loop costs about three times as much per key, which is most of
what a GetMany of 100 L1 hits costs beyond the bare grpc.aio server.
"""

from cachegw_native.hotkeys cimport HotKeys
from cachegw_native.l1 cimport L1Cache


def l1_results(L1Cache l1, list keys, double now, HotKeys hotkeys, tuple tables):
    cdef list low = tables[0]
    cdef list mid = tables[1]
    cdef list high = tables[2]
    cdef Py_ssize_t n = len(keys)
    cdef Py_ssize_t i, j, s
    cdef list pieces = [b""] * (5 * n)
    cdef list missing = []
    cdef tuple entry
    cdef object key
    cdef object counters
    cdef object counted = None  # the class counters of the run of hits being counted
    cdef Py_ssize_t run = 0
    cdef long long ms
    for i in range(n):
        key = keys[i]
        s = l1._lookup(key)
        if s < 0:
            missing.append(i)
            continue
        entry = <tuple>l1._slots[s].value
        counters = entry[2]
        if counters is not counted:  # keys of a batch are mostly of one class: count runs
            if run:
                counted.hits_l1 += run
            counted, run = counters, 0
        run += 1
        if hotkeys is not None:
            hotkeys.add(key)
        ms = <long long>((<double>entry[1] - now) * 1000.0)
        if ms < 0:
            ms = 0
        j = 5 * i
        pieces[j] = entry[3]
        pieces[j + 1] = entry[0]
        # An L1 copy lives less than its class TTL (at most 30 days < 2^35 ms).
        pieces[j + 2] = low[ms & 0x3FFF]
        pieces[j + 3] = mid[(ms >> 14) & 0x3FFF]
        pieces[j + 4] = high[(ms >> 28) & 0x7F]
    if run:
        counted.hits_l1 += run
    return pieces, missing
