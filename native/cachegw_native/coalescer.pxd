cdef class Coalescer:
    cdef dict _inflight      # key -> the future its callers wait on
    cdef set _batches        # run_many load tasks not finished yet (for cancel_all)
    cdef readonly Py_ssize_t coalesced
    cdef readonly Py_ssize_t flights

    cdef _track(self, str key, object fut)
