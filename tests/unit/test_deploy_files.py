"""The deploy files fit the tools that read them: the root .dockerignore sends
what the Dockerfile COPYs and nothing else, the image passes its revision to
mirror in a form mirror accepts, every service manager waits long enough
for mirror's graceful stop before it kills it, and the Kubernetes manifests
fit together (labels, selectors, port names).

The drain time is computed from mirror's own constants, so changing one of
them without the deploy files fails here. YAML is parsed with PyYAML;
tests/integration/test_compose.py checks compose.yaml as docker-compose
reads it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.api.server import SHUTDOWN_TIMEOUT
from mirror.config import load_config
from mirror.proxy import SHUTDOWN_GRACE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"

# The longest mirror takes from SIGTERM to exit. aiohttp's server shutdown
# waits SHUTDOWN_TIMEOUT for requests in flight, then, having cancelled only
# request bodies (which pulls do not have), SHUTDOWN_TIMEOUT again before it
# cancels the handlers; its timeouts round each deadline up to a whole
# second. A slow client is cut at that point whatever server.send_timeout
# says (measured: 61.7 s with send_timeout = 300 s). Then the app's cleanup
# gives downloads already verified SHUTDOWN_GRACE to reach the store.
ROUNDING = 2.0
DRAIN = 2 * SHUTDOWN_TIMEOUT + ROUNDING + SHUTDOWN_GRACE
# What a grace period must leave beyond the drain: closing the database and
# the sessions, a slow fsync, a loaded machine.
MARGIN = 10.0


# --- .dockerignore ----------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's filepath.Match plus `**`)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


class DockerIgnore:
    """A .dockerignore as the builders read it: patterns in order, the last
    one matching a path (or one of its parent directories) decides, and a
    `!` pattern re-includes."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            self.rules.append((include, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


def copied_sources() -> list[str]:
    """The context paths the Dockerfile's COPY lines name (not --from ones)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(args[:-1])
    return sources


def test_the_dockerfile_copies_files_that_exist() -> None:
    sources = copied_sources()
    assert set(sources) == {"pyproject.toml", "README.md", "mirror"}
    for source in sources:
        assert (ROOT / source).exists(), source


def test_dockerignore_keeps_every_file_the_dockerfile_copies() -> None:
    ignore = dockerignore()
    kept = 0
    for source in copied_sources():
        path = ROOT / source
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" in relative:
                continue
            assert not ignore.excluded(relative), relative
            kept += 1
    # pyproject.toml, README.md and the package's modules, subpackages too.
    assert kept > 10
    for module in ("mirror/__init__.py", "mirror/api/server.py", "mirror/cache"):
        assert not ignore.excluded(module), module


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".venv",
        ".git/HEAD",
        ".git",
        "bench-results/run.json",
        ".artifacts/status-page.png",
        "tests/unit/test_deploy_files.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/mirror/app.data.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "mirror.egg-info/PKG-INFO",
        "mirror/__pycache__/app.cpython-311.pyc",
        "mirror/api/__pycache__/server.cpython-311.pyc",
        "build/lib/mirror/app.py",
        "dist/mirror-0.1.0.tar.gz",
        "docs/deployment.md",
        "deploy/compose.yaml",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert dockerignore().excluded(path)


def test_no_dockerfile_specific_ignore_file_shadows_the_root_one() -> None:
    # BuildKit would read it instead of .dockerignore, the legacy builder
    # would not: two files, two different contexts.
    assert not (DEPLOY / "Dockerfile.dockerignore").exists()


def test_dockerignore_matching_follows_docker_rules() -> None:
    ignore = DockerIgnore("*\n!keep/\nkeep/**/*.tmp\n!keep/special.tmp\n")
    assert ignore.excluded("other")
    assert ignore.excluded("other/deep/file")
    assert not ignore.excluded("keep/a.py")
    assert ignore.excluded("keep/a.tmp")
    assert ignore.excluded("keep/sub/b.tmp")
    assert not ignore.excluded("keep/special.tmp")


# --- the image's environment --------------------------------------------------------


def image_environment() -> dict[str, str]:
    """ENV of the Dockerfile's final stage, with ARG defaults substituted."""
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    joined = final.replace("\\\n", " ")
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in joined.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ARG":
            name, _, default = words[1].partition("=")
            args[name] = default
        elif words[0] == "ENV":
            for pair in words[1:]:
                name, _, value = pair.partition("=")
                env[name] = re.sub(
                    r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), value
                )
    return env


def test_the_image_passes_its_revision_to_mirror() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG MIRROR_REVISION=", text, re.MULTILINE)
    assert "MIRROR_REVISION=$MIRROR_REVISION" in text
    assert "--build-arg MIRROR_REVISION=$(git rev-parse --short HEAD)" in text
    assert image_environment()["MIRROR_REVISION"] == "unknown"


def test_mirror_starts_with_the_image_environment() -> None:
    # mirror refuses unknown MIRROR_* variables: the image's own must pass.
    env = {**image_environment(), "MIRROR_REVISION": "0123abcd"}
    config = load_config(None, env)
    # XDG_CACHE_HOME makes the volume the default cache.dir, root or not.
    assert config.cache.dir == Path("/var/cache/mirror")


def test_the_build_arg_becomes_the_revision_label() -> None:
    program = (
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from mirror.metrics import Metrics\n"
        "registry = CollectorRegistry()\n"
        "Metrics(registry)\n"
        "print(generate_latest(registry).decode())\n"
    )
    env = {**os.environ, **image_environment(), "MIRROR_REVISION": "0123abcd"}
    out = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (line,) = [x for x in out.splitlines() if x.startswith("mirror_build_info{")]
    assert 'revision="0123abcd"' in line


# --- grace periods ------------------------------------------------------------------


def _seconds(text: str) -> float:
    value = re.fullmatch(r"(\d+)(s|m)?", text.strip())
    assert value, text
    return int(value.group(1)) * (60 if value.group(2) == "m" else 1)


def test_the_drain_is_what_the_deploy_files_say() -> None:
    # The comments in the deploy files and docs/deployment.md spell this out.
    assert (SHUTDOWN_TIMEOUT, SHUTDOWN_GRACE) == (30.0, 10.0)
    assert 2 * SHUTDOWN_TIMEOUT + SHUTDOWN_GRACE == 70.0


def test_compose_waits_for_the_drain() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mirror = compose["services"]["mirror"]
    assert _seconds(mirror["stop_grace_period"]) >= DRAIN + MARGIN
    assert mirror.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_systemd_waits_for_the_drain() -> None:
    text = (DEPLOY / "systemd" / "mirror.service").read_text()
    (timeout,) = re.findall(r"^TimeoutStopSec=(\S+)$", text, re.MULTILINE)
    assert _seconds(timeout) >= DRAIN + MARGIN
    assert not re.search(r"^KillSignal=", text, re.MULTILINE)  # SIGTERM


def test_the_image_says_how_long_a_stop_takes() -> None:
    text = DOCKERFILE.read_text()
    assert "STOPSIGNAL SIGTERM" in text
    assert "docker stop -t 90" in text


# --- Kubernetes -------------------------------------------------------------------


def kubernetes_objects(directory: Path) -> dict[str, dict[str, Any]]:
    """kind -> object, for the manifests directly in `directory`."""
    objects = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            assert document["metadata"]["labels"]["app.kubernetes.io/name"] == "mirror"
            assert document["kind"] not in objects, path
            objects[document["kind"]] = document
    return objects


def test_kubernetes_manifests_fit_together() -> None:
    objects = kubernetes_objects(KUBERNETES)
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
    }
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 1

    # A single replica: a budget of minAvailable 1 would block node drains.
    budget = objects["PodDisruptionBudget"]
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()

    (container,) = pod["spec"]["containers"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # The preStop hook runs inside the grace period, before SIGTERM.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(sleep[1]) + DRAIN + MARGIN
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_kubernetes_service_monitor_scrapes_the_service() -> None:
    # Kept out of `kubectl apply -f deploy/kubernetes/`, which does not
    # recurse (a cluster without the Prometheus Operator has no such kind):
    # kubernetes_objects(KUBERNETES) finds no ServiceMonitor.
    (monitor,) = kubernetes_objects(KUBERNETES / "monitoring").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = kubernetes_objects(KUBERNETES)["Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"
