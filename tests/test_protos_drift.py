"""The committed stubs are exactly what protos/ generates (they are never edited by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "clients" / "python" / "src"


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    sys.modules["_cachegw_generate"] = generate
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc generated nothing"
    for rel in fresh:
        committed = COMMITTED / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from protos/: run `make protos` and commit the result"
        )
