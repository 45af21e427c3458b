# cython: language_level=3
"""Hot-key tracking: a count-min sketch of every key read plus the `capacity` keys with the
highest estimates (a "heavy hitters" top-k). Feed it from Gets; read top() for stats and
for re-warming the hottest keys after a restart.

Cost per add(): one sketch update (depth counters) and a dict lookup; only a key whose
estimate beats the smallest tracked count pays an O(capacity) scan, which on skewed
traffic is rare. Single-threaded like the rest of the package: no locking.
"""

from libc.stdint cimport uint32_t, uint64_t


cdef class HotKeys:
    """The `capacity` most frequent keys seen by add(), with count-min estimates.

    ``width`` is rounded up to a power of two; estimates never under-count and over-count
    by at most about ``2 * total / width`` per row with high probability.
    """

    def __init__(self, Py_ssize_t capacity=64, Py_ssize_t width=4096, Py_ssize_t depth=4):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._sketch = CountMinSketch(width, depth)
        self._top = {}
        self.capacity = capacity
        self._floor = 0

    cpdef add(self, str key, Py_ssize_t count=1):
        """Count `count` (>= 0) more reads of `key`."""
        cdef unsigned long long est
        cdef object low_key
        if count < 0:
            raise ValueError("count must be >= 0")
        est = self._sketch.add_hash(<uint64_t>hash(key), <uint32_t>min(<uint64_t>count, CG_U32_MAX))
        if key in self._top or len(self._top) < self.capacity:
            self._top[key] = est
            if est < self._floor:
                self._floor = est  # the floor must never be above the smallest count
            return
        if est <= self._floor:
            return
        low_key = min(self._top, key=self._top.__getitem__)  # first of the smallest
        self._floor = self._top[low_key]
        if est > self._floor:
            del self._top[low_key]
            self._top[key] = est
            self._floor = min(self._top.values())

    def estimate(self, str key):
        return self._sketch.estimate_hash(<uint64_t>hash(key))

    def top(self, Py_ssize_t n):
        """Up to `n` tracked keys with their counts, most first (ties by key)."""
        if n <= 0:
            return []
        return sorted(self._top.items(), key=_hot_order)[:n]

    def decay(self):
        """Halve every count, so that keys hot long ago make room for keys hot now."""
        self._sketch.decay()
        for key in self._top:
            self._top[key] //= 2
        self._floor = min(self._top.values()) if self._top else 0

    def clear(self):
        self._sketch.clear()
        self._top.clear()
        self._floor = 0

    def __len__(self):
        return len(self._top)

    @property
    def width(self):
        return self._sketch.width

    @property
    def depth(self):
        return self._sketch.depth


def _hot_order(item):
    return (-item[1], item[0])
