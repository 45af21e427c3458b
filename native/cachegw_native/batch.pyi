"""Typed face of the compiled GetMany loop (batch.pyx); see its docstring."""

from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

def l1_results(
    l1: L1Cache,
    keys: list[str],
    now: float,
    hotkeys: HotKeys | None,
    tables: tuple[list[bytes], list[bytes], list[bytes]],
) -> tuple[list[bytes], list[int]]: ...
