"""Each compiled module's hand-written .pyi names exactly the public members its classes
have, so mypy checks callers against the truth (tests/test_imports.py covers importing)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cachegw_native

PACKAGE = Path(cachegw_native.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.pyx"))


def test_every_pyx_has_a_stub_and_a_pxd() -> None:
    assert MODULES, "no compiled modules found"
    for stem in MODULES:
        assert (PACKAGE / f"{stem}.pyi").exists(), stem
        assert (PACKAGE / f"{stem}.pxd").exists(), stem


def stub_classes(stem: str) -> dict[str, set[str]]:
    tree = ast.parse((PACKAGE / f"{stem}.pyi").read_text())
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = {
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            classes[node.name] = members
    return classes


@pytest.mark.parametrize("stem", MODULES)
def test_stub_members_match_the_runtime(stem: str) -> None:
    module = importlib.import_module(f"cachegw_native.{stem}")
    for name, members in stub_classes(stem).items():
        cls = getattr(module, name)
        public = {m for m in dir(cls) if not m.startswith("_")}
        if issubclass(cls, BaseException):
            continue
        assert public == {m for m in members if not m.startswith("_")}, name
        for dunder in (m for m in members if m.startswith("__")):
            assert hasattr(cls, dunder), f"{name}.{dunder}"
