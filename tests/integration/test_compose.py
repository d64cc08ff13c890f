"""deploy/compose.yaml as docker-compose reads it, and the files its
monitoring profile mounts.

``docker-compose config`` validates the file against the Compose
Specification schema and prints it resolved; it needs no Docker engine (the
tests point DOCKER_HOST nowhere to make sure). Debian's docker-compose 1.29
is what CI installs: it refuses a top-level ``name:``, which Compose v2
accepts, and it prints every service whatever the profile, each with its
``profiles``. With a Compose v2 ``docker-compose`` binary the same tests run
on ``config --format json``. Compose v2 cannot be installed here, so its
acceptance of the file rests on the schema check of 1.29 (the same
specification, an older copy of its schema) and on nothing here using what
v2 dropped.

YAML (docker-compose 1.29's output, prometheus.yml, Grafana's
provisioning) is parsed with PyYAML. The Kubernetes manifests need no tool
but PyYAML: tests/unit/test_deploy_files.py checks them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_deploy_files import DRAIN, MARGIN

from .tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> str:
    return require_tool("docker-compose")


def _python_of(script: str) -> str | None:
    """The interpreter of a Python script (its #! line), if it is one."""
    try:
        with Path(script).open("rb") as file:
            first = file.readline(200).decode(errors="replace")
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return first[2:].split()[0]
    return None


def load_yaml(text: str) -> list[Any]:
    """Every document of a YAML text."""
    return list(yaml.safe_load_all(text))


def _environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "DOCKER_", "MIRROR_"))
    }
    # No engine: `config` must not need one.
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    env["COMPOSE_PROJECT_NAME"] = "mirror"
    return env


def compose(*args: str) -> str:
    """Run docker-compose on deploy/compose.yaml; its stdout."""
    done = subprocess.run(
        [_compose(), "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=DEPLOY,
        env=_environment(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def compose_config(profiles: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved file, as docker-compose prints it."""
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    if _python_of(_compose()) is None:  # Compose v2, a Go binary
        config: dict[str, Any] = json.loads(
            compose(*flags, "config", "--format", "json")
        )
        return config
    (config,) = load_yaml(compose(*flags, "config"))
    return config


def _duration(value: str | float) -> float:
    """Compose durations: 1.29 keeps "90s", v2 prints Go's "1m30s"."""
    if isinstance(value, int | float):
        return float(value) / 1e9  # v2's JSON gives nanoseconds
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    assert value, value
    assert match, value
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from 1.29's strings or v2's mappings."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        else:
            mounts[volume["target"]] = (
                volume["source"],
                bool(volume.get("read_only")),
            )
    return mounts


def _ports(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address, published, target) of each published port."""
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, str):
            *host, published, target = port.removesuffix("/tcp").split(":")
            ports.add(((host or [""])[0], int(published), int(target)))
        else:
            ports.add(
                (port.get("host_ip", ""), int(port["published"]), int(port["target"]))
            )
    return ports


def _profiles(service: dict[str, Any]) -> list[str]:
    profiles: list[str] = service.get("profiles", [])
    return profiles


# --- compose.yaml -----------------------------------------------------------------


def test_compose_file_has_no_top_level_name() -> None:
    # docker-compose 1.29 refuses it; the project name is `-p mirror`.
    assert not re.search(r"^name:", COMPOSE.read_text(), re.MULTILINE)


def test_compose_config_without_a_profile_runs_the_mirror() -> None:
    config = compose_config()
    mirror = config["services"]["mirror"]
    assert _profiles(mirror) == []  # started by a plain `up`
    assert mirror["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(mirror["build"]["context"]) == ROOT
    assert _ports(mirror) == {("", 5000, 5000)}  # every address: it is the point
    assert _mounts(mirror)["/var/cache/mirror"][0] == "cache"
    assert _duration(mirror["stop_grace_period"]) >= DRAIN + MARGIN
    assert mirror["stop_signal"] == "SIGTERM"
    assert mirror["ulimits"]["nofile"] == {"soft": 65536, "hard": 65536}
    assert set(config["volumes"]) == {"cache", "prometheus", "grafana"}
    # Only the monitoring services carry a profile.
    for name, service in config["services"].items():
        if name != "mirror":
            assert _profiles(service) == ["monitoring"], name


def test_compose_knows_the_monitoring_profile() -> None:
    assert compose("config", "--profiles").split() == ["monitoring"]
    services = compose("--profile", "monitoring", "config", "--services").split()
    assert set(services) == {"mirror", "prometheus", "grafana"}


def test_compose_monitoring_profile_runs_prometheus_on_the_shipped_rules() -> None:
    config = compose_config(["monitoring"])
    prometheus = config["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus"] == (str(DEPLOY / "prometheus"), True)
    assert mounts["/prometheus"] == ("prometheus", False)
    assert _ports(prometheus) == {("127.0.0.1", 9090, 9090)}

    # What the container will read: prometheus.yml scrapes the mirror service
    # and loads rule files that are in the mounted directory.
    (scrape,) = load_yaml((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in scrape["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "mirror:5000" in targets
    rule_files = scrape.get("rule_files", [])
    assert rule_files, "prometheus.yml loads no rules"
    for rule_file in rule_files:
        # Prometheus resolves a relative path against its config file's.
        relative = rule_file.removeprefix("/etc/prometheus/")
        assert not relative.startswith("/"), f"{rule_file} is not in the mount"
        assert (DEPLOY / "prometheus" / relative).is_file(), rule_file


def test_compose_monitoring_profile_runs_grafana_with_the_dashboard() -> None:
    config = compose_config(["monitoring"])
    grafana = config["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana-oss"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), "pin a Grafana release"
    assert _ports(grafana) == {("127.0.0.1", 3000, 3000)}
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    dashboard = "/var/lib/grafana/dashboards/mirror.json"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard
    mounts = _mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning"] == (str(provisioning), True)
    assert mounts[dashboard] == (str(DEPLOY / "grafana" / "mirror.json"), True)
    assert json.loads((DEPLOY / "grafana" / "mirror.json").read_text())["panels"]

    # The provisioning reaches the Prometheus service and the mounted file.
    provisioned = [
        document
        for path in sorted(provisioning.rglob("*.y*ml"))
        for document in load_yaml(path.read_text())
    ]
    sources = [s for d in provisioned for s in d.get("datasources", [])]
    assert any(
        s["type"] == "prometheus" and s["url"] == "http://prometheus:9090"
        for s in sources
    ), sources
    providers = [p for d in provisioned for p in d.get("providers", [])]
    assert any(
        p.get("options", {}).get("path") in (dashboard, str(Path(dashboard).parent))
        for p in providers
    ), providers
