"""Reading the shipped monitoring files in tests: the alert rules
(deploy/prometheus/alerts.yml), the Grafana dashboard
(deploy/grafana/mirror.json) and the PromQL in them. YAML is parsed with
PyYAML (yaml.safe_load).

One module for the unit tests (structure, metric names) and the integration
test (every expression against a real Prometheus), so both read the files
the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "mirror.json"
PROVISIONING = GRAFANA_DIR / "provisioning"

# What Grafana puts in place of its variables when the test evaluates a
# panel: `instance` at its All value, ranges long enough to span a test.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
}

# Words of PromQL that look like metric names but are not.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left"}
    | {"group_right", "offset", "bool", "inf", "nan"}
)


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    rule: dict[str, Any]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"panel {self.panel!r} query {self.ref}"


def alerts() -> list[Alert]:
    """Every alerting rule of alerts.yml, in file order."""
    found = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                found.append(Alert(rule["alert"], rule["expr"], rule))
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels, those inside rows included (rows excluded)."""
    found = []
    for panel in dashboard()["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def panel_queries() -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    """The query Grafana would send, its variables filled in."""
    # Longest names first: $__rate_interval before $__range/$__interval.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown Grafana variables {leftover} in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects.

    A small lexer, enough for the expressions we ship: strings, label
    matchers ({...}), ranges ([...]) and label lists after by/without/on/
    ignoring/group_* are removed; what is left that looks like a name and is
    not a function call, a keyword or part of a number or duration is a
    metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can expose, whether or not a labelled
    collector has a child yet: `_total` for counters, `_bucket`, `_sum` and
    `_count` for histograms."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
