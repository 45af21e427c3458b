"""Compiled parts of the gateway: every native/cachegw_native/*.pyx becomes an extension.

Set CACHEGW_DEBUG_BUILD=1 for an annotated build with line tracing (profiling, coverage).
"""

from __future__ import annotations

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = Path("native") / "cachegw_native"
DEBUG = os.environ.get("CACHEGW_DEBUG_BUILD") == "1"

extensions = [
    Extension(
        f"cachegw_native.{pyx.stem}",
        [pyx.as_posix()],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
        extra_compile_args=["-O2"] if not DEBUG else ["-O0", "-g"],
    )
    for pyx in sorted(NATIVE.glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
            "linetrace": DEBUG,
            "profile": DEBUG,
        },
    ),
)
