"""Generate the Python stubs of protos/ into the client package.

The stubs are committed (clients/python/src/cachegw/v1) so that the client installs
without grpcio-tools; tests/test_protos_drift.py regenerates them into a temporary
folder and fails when the committed copy differs.

    python protos/generate.py [OUT_ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
DEFAULT_OUT = PROTOS.parent / "clients" / "python" / "src"
SOURCES = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def generate(out_root: Path) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    # mypy-protobuf's plugins sit beside the interpreter, which may not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *SOURCES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {SOURCES}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
