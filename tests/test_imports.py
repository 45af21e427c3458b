"""Every module imports on its own, in a fresh interpreter (no hidden import cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "cachegw_gateway": ROOT / "gateway" / "cachegw_gateway",
    "cachegw_native": ROOT / "native" / "cachegw_native",
    "cachegw": ROOT / "clients" / "python" / "src" / "cachegw",
}


def _modules() -> list[str]:
    names = []
    for package, folder in PACKAGES.items():
        names.append(package)
        for path in sorted(folder.glob("*.py")) + sorted(folder.glob("*.pyx")):
            if path.stem not in ("__init__", "__main__"):
                names.append(f"{package}.{path.stem}")
    return names


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
