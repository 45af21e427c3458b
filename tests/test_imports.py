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
        for path in sorted(folder.rglob("*.py")) + sorted(folder.rglob("*.pyx")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] == "v1":  # generated stubs
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[-1] != "__main__":
                names.append(".".join((package, *parts)))
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
