"""The shipped alert rules and Grafana dashboard: promtool checks and runs
the rules' unit tests (deploy/prometheus/alerts.test.yml), every alert is
labelled, annotated, tested and documented, and every expression in the
rules and the dashboard selects only metrics mirror exports, so a renamed
metric fails here. tests/integration/test_monitoring.py evaluates the same
expressions against a real Prometheus scraping a real mirror."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.metrics import Metrics, RegistryMetrics
from tests import monitoring
from tests.integration.tools import require_tool
from tests.unit.test_docs import anchors

OPERATIONS_MD = monitoring.ROOT / "docs" / "operations.md"
ALERTS = monitoring.alerts()
QUERIES = monitoring.panel_queries()
# Not mirror's own: Prometheus's scrape health.
PROMETHEUS_METRICS = {"up"}
SEVERITIES = {"warning", "critical"}
IDLE = "an idle mirror fires nothing"


def promtool(*args: str | Path, cwd: Path = monitoring.PROMETHEUS_DIR) -> str:
    binary = require_tool("promtool")
    done = subprocess.run(
        [binary, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{output}"
    return output


def exported() -> set[str]:
    return monitoring.exported_metric_names(Metrics().registry) | PROMETHEUS_METRICS


# --- promtool -------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    output = promtool("check", "rules", monitoring.ALERTS)
    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_promtool_runs_the_rules_unit_tests() -> None:
    output = promtool("test", "rules", monitoring.ALERT_TESTS)
    assert "SUCCESS" in output


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    output = promtool("check", "config", monitoring.PROMETHEUS_CONFIG)
    assert "SUCCESS: 1 rule files found" in output
    config = yaml.safe_load(monitoring.PROMETHEUS_CONFIG.read_text())
    # Relative to prometheus.yml: /etc/prometheus/alerts.yml in Compose,
    # which mounts deploy/prometheus there.
    assert config["rule_files"] == ["alerts.yml"]
    # MirrorDown selects up{job="mirror"}.
    assert [job["job_name"] for job in config["scrape_configs"]] == ["mirror"]
    assert 'up{job="mirror"}' in next(a.expr for a in ALERTS if a.name == "MirrorDown")


# --- the rules ------------------------------------------------------------------


def test_the_alerts_issue_11_asks_for_exist() -> None:
    assert {a.name for a in ALERTS} >= {
        "MirrorDown",
        "MirrorNotReady",
        "MirrorPullBudgetLow",
        "MirrorUpstreamThrottled",
        "MirrorUpstreamDown",
        "MirrorServingStale",
        "MirrorVerificationFailures",
        "MirrorUpstreamCredentialsRejected",
        "MirrorCacheChurn",
        "MirrorCacheDiskLow",
        "MirrorHighErrorRate",
        "MirrorDownloadQueueLong",
    }
    assert len({a.name for a in ALERTS}) == len(ALERTS), "duplicate alert names"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a.name)
def test_alert_is_labelled_annotated_and_documented(alert: monitoring.Alert) -> None:
    rule = alert.rule
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    # Every alert says which node it is about.
    assert "$labels.instance" in annotations["summary"]
    assert "$labels.instance" in annotations["description"]
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "docs/operations.md"
    assert anchor == alert.name.lower()
    assert anchor in anchors(OPERATIONS_MD), f"no runbook section for {alert.name}"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a.name)
def test_alert_keeps_the_instance_label(alert: monitoring.Alert) -> None:
    """Aggregations keep `instance`, so each node of a multi-node mirror
    alerts on its own."""
    for aggregation in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", alert.expr):
        assert "instance" in [label.strip() for label in aggregation.split(",")], (
            f"{alert.name}: aggregation ({aggregation}) drops instance"
        )
    assert re.search(r"\b(?:by|on)\s*\(", alert.expr) or alert.name == "MirrorDown"


def _rule_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = yaml.safe_load(monitoring.ALERT_TESTS.read_text())[
        "tests"
    ]
    return tests


Series = tuple[str, frozenset[tuple[str, str]]]


def _series(selector: str) -> Series:
    """A rules-test series, `name{job=..., instance=..., labels}`, as its name
    and the labels mirror sets (Prometheus adds job and instance)."""
    name, _, labels = selector.partition("{")
    pairs = re.findall(r'(\w+)="([^"]*)"', labels)
    return name, frozenset((k, v) for k, v in pairs if k not in ("job", "instance"))


def fresh_series() -> set[Series]:
    """What a just-started mirror serving docker.io exports of the metrics
    the alerts select: collectors without labels, and the labelled series
    created at start-up (the failure counters at 0, upstream up/throttled)."""
    metrics = Metrics()
    RegistryMetrics(metrics, "docker.io")
    watched = set().union(*(monitoring.metric_names(a.expr) for a in ALERTS))
    return {
        (sample.name, frozenset(sample.labels.items()))
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name in watched
    }


def test_every_alert_fires_in_a_rules_test_and_stays_silent_in_another() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in _rule_tests():
        if case["name"] == IDLE:
            continue
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    names = {a.name for a in ALERTS}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested staying silent"
    assert firing | silent <= names, "tests of alerts that do not exist"


def test_an_idle_mirror_fires_nothing_is_tested_for_every_alert() -> None:
    (idle,) = [case for case in _rule_tests() if case["name"] == IDLE]
    checked = {
        check["alertname"]
        for check in idle["alert_rule_test"]
        if check["exp_alerts"] == [] and check["eval_time"] == "60m"
    }
    assert checked == {a.name for a in ALERTS}
    values = {_series(s["series"]): s["values"] for s in idle["input_series"]}
    # Besides what mirror exports at start-up: Prometheus's `up`, and the
    # requests of its scrapes and of readiness probes.
    outside = {
        series
        for series in values
        if series[0] == "up"
        or (
            series[0] == "mirror_http_requests_total"
            and dict(series[1])["route"] in ("metrics", "readyz")
        )
    }
    assert {name for name, _ in outside} == {"up", "mirror_http_requests_total"}
    # What a fresh mirror exports and nothing it does not: the failure
    # counters at 0 for every label value, no rate-limit series before a
    # registry sent headers.
    assert set(values) - outside == fresh_series()
    names = {name for name, _ in values}
    assert "mirror_upstream_ratelimit_limit" not in names
    assert "mirror_upstream_ratelimit_remaining" not in names
    for name in (
        "mirror_verification_failures_total",
        "mirror_upstream_auth_failures_total",
        "mirror_http_connections_rejected_total",
    ):
        idle_counters = [v for (n, _), v in values.items() if n == name]
        assert idle_counters, name
        assert set(idle_counters) == {"0x60"}, name


# --- metric names ---------------------------------------------------------------


def test_metric_names_reads_selectors_not_labels_functions_or_durations() -> None:
    expr = (
        'sum by (instance, le) (rate(mirror_x_bucket{route="a|b", le!="1"}[5m] '
        "offset 10m)) / on (instance) group_left (registry) mirror_y > bool 0.5 "
        'and ignoring (kind) histogram_quantile(0.9, up{job="mirror"}) or vector(1)'
    )
    assert monitoring.metric_names(expr) == {"mirror_x_bucket", "mirror_y", "up"}


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a.name)
def test_alert_uses_only_exported_metrics(alert: monitoring.Alert) -> None:
    names = monitoring.metric_names(alert.expr)
    assert names, f"{alert.name} selects no metric"
    assert names <= exported(), f"{alert.name}: {names - exported()} not exported"


@pytest.mark.parametrize("query", QUERIES, ids=str)
def test_panel_uses_only_exported_metrics(query: monitoring.PanelQuery) -> None:
    names = monitoring.metric_names(query.expr)
    assert names, f"{query} selects no metric"
    assert names <= exported(), f"{query}: {names - exported()} not exported"


def test_exported_names_include_process_metrics_and_not_created_series() -> None:
    names = exported()
    assert {"process_open_fds", "process_start_time_seconds"} <= names
    assert "mirror_http_requests_total" in names
    assert "mirror_http_request_duration_seconds_bucket" in names
    assert not any(name.endswith("_created") for name in names)


# --- the dashboard --------------------------------------------------------------


def test_dashboard_shape() -> None:
    board = monitoring.dashboard()
    assert board["uid"] == "mirror"
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["includeAll"] is True
    assert instance["allValue"] == ".*"
    assert "label_values(mirror_build_info, instance)" in instance["definition"]
    ids = [panel["id"] for panel in board["panels"]] + [
        p["id"] for row in board["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in monitoring.panels():
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_dashboard_has_the_panels_issue_11_asks_for() -> None:
    titles = {panel["title"] for panel in monitoring.panels()}
    assert titles >= {
        "Requests by route and status",
        "Pulls by result",
        "Hit ratio",
        "Upstream bytes saved vs fetched",
        "Pull budget remaining",
        "Downloads in flight and queued",
        "Cache size and budget",
        "Evictions",
        "Request duration by route",
        "Upstream time to first byte",
        "Readiness",
        "Version",
        "Uptime",
    }


@pytest.mark.parametrize("query", QUERIES, ids=str)
def test_panel_selects_the_chosen_instances(query: monitoring.PanelQuery) -> None:
    """Every selector filters on $instance, so the variable applies to every
    panel, and only known Grafana variables are used."""
    for name in monitoring.metric_names(query.expr):
        for found in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", query.expr):
            rest = query.expr[found.end() :]
            assert re.match(r'\{[^}]*instance=~"\$instance"', rest), (
                f"{query}: {name} does not filter on $instance"
            )
    monitoring.substitute(query.expr)


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load(
        (monitoring.PROVISIONING / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    (prometheus,) = datasources
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in monitoring.dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == prometheus["uid"]
    (provider,) = yaml.safe_load(
        (monitoring.PROVISIONING / "dashboards" / "mirror.yaml").read_text()
    )["providers"]
    assert provider["type"] == "file"
    # deploy/compose.yaml mounts mirror.json into this directory.
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
