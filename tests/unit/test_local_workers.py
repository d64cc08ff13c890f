"""Several mirror processes on one machine: deploy/haproxy/local-workers.cfg
and deploy/systemd/mirror@.service fit together.

``haproxy -c`` checks the file as shipped. Apart from its comments and
server lines it must be the cluster's haproxy.cfg, directive for directive,
so the same hashing, checks and retries are deployed in both. Its server
lines must be the template's instances: server ``worker<i>`` with ring id
``<i>`` at the address instance ``<i>`` listens on, and the environment the
template gives instance ``<i>`` must load, with the shipped mirror.toml, to
that address and a cache directory of its own.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from mirror.config import load_config
from tests.integration.haproxy import SHIPPED_CONFIG, check_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LOCAL_WORKERS = DEPLOY / "haproxy" / "local-workers.cfg"
TEMPLATE = DEPLOY / "systemd" / "mirror@.service"
SINGLE = DEPLOY / "systemd" / "mirror.service"
MIRROR_TOML = DEPLOY / "systemd" / "mirror.toml"
SERVER = re.compile(r"^server (?P<name>\S+) (?P<address>\S+) id (?P<id>\d+)$")


def directives(path: Path) -> list[tuple[str, str]]:
    """(section, directive) for every non-comment line, whitespace folded."""
    found = []
    section = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        found.append((section, " ".join(line.split())))
    return found


def without_servers(path: Path) -> list[tuple[str, str]]:
    return [(s, d) for s, d in directives(path) if not d.startswith("server ")]


def servers(path: Path) -> list[re.Match[str]]:
    matches = []
    for section, directive in directives(path):
        if directive.startswith("server "):
            assert section == "backend mirror_nodes", directive
            match = SERVER.match(directive)
            assert match is not None, directive
            matches.append(match)
    return matches


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file, in order."""
    prefix = f"{key}="
    return [
        line.removeprefix(prefix)
        for line in path.read_text().splitlines()
        if line.startswith(prefix)
    ]


def instance_environment(number: int) -> dict[str, str]:
    """The MIRROR_* variables the template gives instance ``number``."""
    env = {}
    for value in unit_values(TEMPLATE, "Environment"):
        name, _, setting = value.partition("=")
        if name.startswith("MIRROR_"):
            env[name] = setting.replace("%i", str(number))
    return env


def test_haproxy_accepts_the_local_workers_file_without_a_warning() -> None:
    done = check_config(LOCAL_WORKERS)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output


def test_everything_but_the_server_lines_is_the_cluster_file() -> None:
    local = without_servers(LOCAL_WORKERS)
    assert local == without_servers(SHIPPED_CONFIG)
    assert ("backend mirror_nodes", "hash-type consistent") in local


def test_the_server_lines_are_the_template_instances() -> None:
    lines = servers(LOCAL_WORKERS)
    assert len(lines) >= 2
    ids = [int(line["id"]) for line in lines]
    # Instance i is `server worker<i> ... id <i>`, numbered from 1 up: the
    # ring is built from the ids, and the template's port holds one digit.
    assert ids == list(range(1, len(lines) + 1))
    assert max(ids) <= 9
    for line in lines:
        number = int(line["id"])
        assert line["name"] == f"worker{number}"
        env = instance_environment(number)
        assert line["address"] == env["MIRROR_SERVER_LISTEN"]
        host, _, port = line["address"].rpartition(":")
        assert ipaddress.ip_address(host).is_loopback
        assert int(port) == 5000 + number


def test_each_instance_loads_its_own_port_and_cache_dir() -> None:
    seen = set()
    for line in servers(LOCAL_WORKERS):
        number = int(line["id"])
        config = load_config(MIRROR_TOML, instance_environment(number))
        assert str(config.server.listen) == line["address"]
        assert config.cache.dir == Path(f"/var/cache/mirror/{number}")
        assert [str(net) for net in config.server.trusted_proxies] == ["127.0.0.1/32"]
        seen.add(config.cache.dir)
    assert len(seen) == len(servers(LOCAL_WORKERS))


def test_the_cache_dir_is_the_instance_cache_directory() -> None:
    # systemd creates CacheDirectory= under /var/cache, writable despite
    # ProtectSystem=strict: MIRROR_CACHE_DIR must name exactly it.
    (directory,) = unit_values(TEMPLATE, "CacheDirectory")
    assert instance_environment(3)["MIRROR_CACHE_DIR"] == "/var/cache/" + (
        directory.replace("%i", "3")
    )


@pytest.mark.parametrize(
    "key",
    ["ExecStart", "ExecReload", "TimeoutStopSec", "LimitNOFILE", "SystemCallFilter"],
)
def test_the_template_runs_mirror_as_the_single_unit_does(key: str) -> None:
    assert unit_values(TEMPLATE, key) == unit_values(SINGLE, key)
