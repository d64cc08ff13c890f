"""The docs name every configuration key and metric the code defines, and the
configuration and client files they and deploy/ show are ones that work."""

from __future__ import annotations

import re
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry

from mirror.config import DOCKER_IO, SECTIONS, Config, describe, load_config
from mirror.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DEPLOY = ROOT / "deploy"
REGISTRIES_MD = DOCS / "registries.md"
PUBLIC_REGISTRIES = {
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "public.ecr.aws",
    "mcr.microsoft.com",
}
# The registries the end-to-end check in registries.md pulls from.
CHECKED_REGISTRIES = {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
# Where each host's `server` is, when it is not the host itself.
SERVER_HOSTS = {"docker.io": "registry-1.docker.io"}
MIRROR_ADDRESS = "mirror.internal:5000"
# Metrics of one upstream registry: each has a `registry` label.
PER_REGISTRY_METRICS = {
    "mirror_cache_requests_total",
    "mirror_upstream_requests_total",
    "mirror_upstream_bytes_total",
    "mirror_upstream_retries_total",
    "mirror_upstream_up",
    "mirror_upstream_auth_failures_total",
    "mirror_upstream_invalid_responses_total",
    "mirror_upstream_ratelimit_limit",
    "mirror_upstream_ratelimit_remaining",
    "mirror_verification_failures_total",
    "mirror_blob_resumes_total",
    "mirror_repository_denials_total",
}


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, text, and the paragraph line just
    before it (which names the file the block is)."""

    language: str
    text: str
    caption: str


def code_blocks(path: Path, language: str) -> list[Block]:
    blocks = []
    caption = ""
    lines = iter(path.read_text().splitlines())
    for line in lines:
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence is None:
            if line.strip():
                caption = line.strip()
            continue
        indent, lang = fence.groups()
        body = []
        for inner in lines:
            if inner.strip() == "```":
                break
            body.append(inner.removeprefix(indent))
        if lang == language:
            blocks.append(Block(lang, "\n".join(body) + "\n", caption))
        caption = ""
    return blocks


def toml_kind(data: dict[str, Any]) -> str:
    """What a TOML block in the docs is, by what it holds."""
    if data and set(data) <= {*SECTIONS, "registries"}:
        return "mirror"
    if "host" in data:
        return "hosts.toml"
    if "registry" in data or "unqualified-search-registries" in data:
        return "registries.conf"
    if "plugins" in data:
        return "containerd config.toml"
    return "unknown"


def load_text(text: str, tmp_path: Path, name: str = "mirror.toml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, {})


def check_hosts_toml(data: dict[str, Any], where: str) -> str:
    """Checks a hosts.toml; returns the host of its `server`."""
    server = urlsplit(str(data.get("server", "")))
    assert server.scheme == "https", f"{where}: server must be the real registry"
    assert data["host"], where
    for url, host in data["host"].items():
        assert urlsplit(url).scheme in {"http", "https"}, f"{where}: {url}"
        capabilities = host.get("capabilities")
        assert isinstance(capabilities, list), f"{where}: {url} has no capabilities"
        assert {"pull", "resolve"} <= set(capabilities), f"{where}: {url}"
    assert server.hostname is not None
    return server.hostname


# --- keys and metrics -------------------------------------------------------------


def test_every_config_key_and_variable_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for key, variable, _default, _doc in describe():
        assert f"`{key}`" in text, key
        assert f"`{variable}`" in text, variable


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    for metric in Metrics().registry.collect():
        name = metric.name
        if metric.type == "counter":
            name += "_total"
        assert f"`{name}`" in text, name


def test_every_metric_is_documented_with_its_labels() -> None:
    """Each metric's row in metrics.md lists exactly its labels (`registry`
    among them, for the metrics of one upstream)."""
    rows = {
        match.group(1): set(re.findall(r"`(\w+)`", match.group(2)))
        for match in re.finditer(
            r"^\| `(mirror_\w+)` \| \w+ \|([^|]*)\|",
            (DOCS / "metrics.md").read_text(),
            re.MULTILINE,
        )
    }
    with_registry = set()
    for collector in vars(Metrics()).values():
        if isinstance(collector, CollectorRegistry):
            continue
        name = collector._name + ("_total" if collector._type == "counter" else "")
        labels = set(collector._labelnames)
        assert rows[name] == labels, name
        if "registry" in labels:
            with_registry.add(name)
    assert with_registry >= PER_REGISTRY_METRICS


# --- deploy/registries-public.toml and the Kubernetes files ------------------------


def test_registries_public_toml_loads_with_the_public_registries() -> None:
    config = load_config(DEPLOY / "registries-public.toml", {})
    docker_io, *others = config.registry_configs()
    assert docker_io.host == DOCKER_IO
    assert docker_io.upstream.url == "https://registry-1.docker.io"
    assert {r.host for r in others} == PUBLIC_REGISTRIES
    for registry in others:
        url = urlsplit(registry.upstream.url)
        assert url.scheme == "https", registry.host
        assert url.hostname == registry.host, registry.host
        # Anonymous: no account of anyone's ships in the example.
        assert not registry.upstream.username, registry.host


def kubernetes_mirror_toml() -> str:
    """The mirror.toml inside deploy/kubernetes/configmap.yaml."""
    text = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    _, found, body = text.partition("  mirror.toml: |\n")
    assert found, "configmap.yaml has no mirror.toml"
    return textwrap.dedent(body)


def test_kubernetes_configmap_serves_the_public_registries(tmp_path: Path) -> None:
    config = load_text(kubernetes_mirror_toml(), tmp_path)
    assert {r.host for r in config.registries} == PUBLIC_REGISTRIES
    assert config.cache.max_size < 100 * 1024**3  # below pvc.yaml's 100Gi


def test_kubernetes_node_files_cover_every_registry_of_the_configmap(
    tmp_path: Path,
) -> None:
    config = load_text(kubernetes_mirror_toml(), tmp_path)
    certs = DEPLOY / "kubernetes" / "certs.d"
    directories = {d.name for d in certs.iterdir() if d.is_dir()}
    assert directories == {r.host for r in config.registry_configs()}
    for directory in directories:
        path = certs / directory / "hosts.toml"
        data = tomllib.loads(path.read_text())
        server = check_hosts_toml(data, str(path))
        assert server == SERVER_HOSTS.get(directory, directory), path
        assert list(data["host"]) == ["http://10.96.0.50:5000"], path


def test_deploy_toml_files_load() -> None:
    assert load_config(DEPLOY / "systemd" / "mirror.toml", {}).registries == ()


# --- docs/registries.md ---------------------------------------------------------------


def registries_md_toml() -> list[tuple[Block, dict[str, Any]]]:
    return [(b, tomllib.loads(b.text)) for b in code_blocks(REGISTRIES_MD, "toml")]


def test_every_toml_block_in_registries_md_is_of_a_known_kind() -> None:
    blocks = registries_md_toml()
    assert blocks
    for block, data in blocks:
        assert toml_kind(data) != "unknown", block.text


def test_every_mirror_config_in_registries_md_loads(tmp_path: Path) -> None:
    configs = [b for b, data in registries_md_toml() if toml_kind(data) == "mirror"]
    assert configs
    for block in configs:
        load_text(block.text, tmp_path)


def test_every_hosts_toml_in_registries_md_names_pull_and_resolve() -> None:
    named: dict[str, str] = {}
    for block, data in registries_md_toml():
        if toml_kind(data) != "hosts.toml":
            continue
        server = check_hosts_toml(data, block.caption)
        caption = re.search(r"certs\.d/([^/]+)/hosts\.toml", block.caption)
        assert caption, f"say which file this is: {block.text}"
        named[caption.group(1)] = server
    assert set(named) >= CHECKED_REGISTRIES
    for directory, server in named.items():
        assert server == SERVER_HOSTS.get(directory, directory), directory


def test_registries_conf_in_registries_md_mirrors_by_path_prefix() -> None:
    blocks = [d for _b, d in registries_md_toml() if toml_kind(d) == "registries.conf"]
    assert blocks
    prefixes = set()
    for data in blocks:
        for registry in data["registry"]:
            prefix = registry["prefix"]
            prefixes.add(prefix)
            assert registry["location"] == prefix
            wanted = (
                MIRROR_ADDRESS if prefix == DOCKER_IO else f"{MIRROR_ADDRESS}/{prefix}"
            )
            assert [m["location"] for m in registry["mirror"]] == [wanted]
    assert prefixes >= CHECKED_REGISTRIES


def test_k3s_registries_yaml_in_registries_md_lists_the_checked_registries() -> None:
    (block,) = [b for b in code_blocks(REGISTRIES_MD, "yaml") if "mirrors:" in b.text]
    hosts = set(re.findall(r"^  ([a-z0-9.-]+):$", block.text, re.MULTILINE))
    assert hosts == CHECKED_REGISTRIES
    assert "rewrite" not in block.text


# --- links ------------------------------------------------------------------------


def without_code(path: Path) -> str:
    return re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", without_code(path), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


MARKDOWN = sorted([ROOT / "README.md", *DOCS.glob("*.md"), *DEPLOY.rglob("*.md")])


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}"
