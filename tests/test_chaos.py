"""`make chaos --quick` in CI: every chaos routine against a real topology, checks passed.

The routines and their checks live in benchmarks/chaos.py; this runs its quick size (50k
keys per mass invalidation, short faults: under a minute here) as a user runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_chaos_routines_pass() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
    )
    report = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "all checks passed" in proc.stdout, report
    for routine in (
        "node eviction",
        "mass invalidation: prefix",
        "mass invalidation: tag",
        "mass invalidation: class",
        "partition: blackhole",
        "partition: reset",
    ):
        assert routine in proc.stdout, report
