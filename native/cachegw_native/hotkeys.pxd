from cachegw_native.sketch cimport CG_U32_MAX, CountMinSketch


cdef class HotKeys:
    cdef CountMinSketch _sketch
    cdef dict _top            # tracked key -> its estimate when last added
    cdef readonly Py_ssize_t capacity
    cdef unsigned long long _floor  # <= the smallest tracked count while full

    cpdef add(self, str key, Py_ssize_t count=*)
