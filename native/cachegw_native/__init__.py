"""Compiled hot path of the gateway: the L1 cache, the request coalescer, the hot-key sketch.

These modules are Cython extensions built by the package build; there is no pure-Python
fallback at run time (the plain-Python models live in tests/ only).
"""
