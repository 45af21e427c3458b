"""docs/ops: the alert rules pass promtool, the dashboard is well formed, and every
metric either of them names is exported by a running gateway."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory

OPS = Path(__file__).resolve().parent.parent / "docs" / "ops"
RULES = OPS / "prometheus-alerts.yml"
RULE_TESTS = OPS / "alerts-test.yml"
DASHBOARD = OPS / "grafana-dashboard.json"
METRIC = re.compile(r"\bcachegw_[a-z0-9_]+\b")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: `make setup` installs Debian's prometheus package when run "
    "as root with apt-get; elsewhere install promtool (Prometheus) to check the rules",
)


@needs_promtool
def test_rules_pass_promtool_check_and_unit_tests() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run(
            [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _rule_exprs() -> list[str]:
    # The whole file: every cachegw_* name in it is in an expression (promtool parses it).
    return [RULES.read_text()]


def test_dashboard_is_well_formed() -> None:
    dash = _dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}


def _exported(text: str) -> set[str]:
    """Every series name a scrape can show, with a family's suffixes even when it has
    no sample yet (an error counter before the first error)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


async def test_every_metric_used_is_exported(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(telemetry__metrics_listen="127.0.0.1:0")
    await gw.stub.Get(pb.GetRequest(key="k"))
    url = f"http://{gw.server.metrics_address}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body: str = reply.read().decode()
            return body

    exported = _exported(await asyncio.to_thread(scrape))
    used = {m for expr in _dashboard_exprs() + _rule_exprs() for m in METRIC.findall(expr)}
    assert len(used) > 20
    assert sorted(used - exported) == []
