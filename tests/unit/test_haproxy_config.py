"""deploy/haproxy/haproxy.cfg: valid for HAProxy 2.6, with the directives the
cluster depends on, and the shard keys it computes.

``haproxy -c`` checks the shipped file as it is (its server lines are IP
addresses, so nothing needs resolving). The directives are read with a
small parser of HAProxy's sections, so a change that drops consistent
hashing, the health check or the retry policy fails here with a reason.

The keys are checked by running the shipped file, with loopback ports and
three stand-in nodes (``http.server`` threads that record each request and
answer 200): HAProxy logs every request's key (the shipped log format ends
with it), so the test reads exactly what HAProxy hashed, and the stand-ins
show that the path reaches the node unchanged. The mirror itself behind
HAProxy is tests/integration/test_cluster.py's subject.
"""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.haproxy import (
    HAPROXY_PATH,
    SHIPPED_CONFIG,
    HaproxyProcess,
    Server,
    check_config,
    render_config,
)
from tests.integration.tools import require_tool

BLOB = "sha256:" + "ab" * 32
REFERRED = "sha256:" + "cd" * 32


def haproxy() -> str:
    return require_tool("haproxy", prefer=HAPROXY_PATH)


def sections(text: str) -> dict[str, list[str]]:
    """Section header -> its directives (comments and blank lines dropped)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        # No directive in the file carries a trailing comment.
        if line.lstrip().startswith("#"):
            continue
        if not line.strip():
            continue
        if not line[0].isspace():
            current = found.setdefault(line.strip(), [])
        elif current is not None:
            current.append(" ".join(line.split()))
    return found


@pytest.fixture(scope="module")
def config() -> dict[str, list[str]]:
    return sections(SHIPPED_CONFIG.read_text())


def test_haproxy_accepts_the_shipped_file_without_a_warning() -> None:
    done = check_config(SHIPPED_CONFIG)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Configuration file is valid" in output
    assert "[WARNING]" not in output, output
    assert "[ALERT]" not in output, output


def test_the_backend_hashes_consistently_on_the_shard_key(
    config: dict[str, list[str]],
) -> None:
    backend = config["backend mirror_nodes"]
    assert "balance hash var(txn.shard_key)" in backend
    assert "hash-type consistent" in backend
    # Bounded load would spread a herd on one blob over several nodes.
    assert not any(d.startswith("hash-balance-factor") for d in backend)
    # No slowstart: on a ring it keeps part of a returning node's keys away.
    assert not any("slowstart" in d for d in backend)


def test_nodes_are_checked_on_readyz_and_leave_at_the_first_failed_connect(
    config: dict[str, list[str]],
) -> None:
    backend = config["backend mirror_nodes"]
    assert "option httpchk GET /readyz" in backend
    assert "http-check expect status 200" in backend
    (defaults,) = [d.split()[1:] for d in backend if d.startswith("default-server")]
    settings = dict(zip(defaults[1::2], defaults[2::2], strict=False))
    assert defaults[0] == "check"
    assert settings["inter"] == "2s"
    assert settings["fall"] == "2"
    assert settings["rise"] == "2"
    assert "observe" in defaults
    assert defaults[defaults.index("observe") + 1] == "layer4"
    assert defaults[defaults.index("error-limit") + 1] == "1"
    assert defaults[defaults.index("on-error") + 1] == "mark-down"


def test_every_node_has_a_fixed_unique_id(config: dict[str, list[str]]) -> None:
    """The ring is built from the ids: implicit ones would shift when a line
    is added or removed, moving every key."""
    servers = [
        d.split() for d in config["backend mirror_nodes"] if d.startswith("server ")
    ]
    assert len(servers) >= 2
    ids = [words[words.index("id") + 1] for words in servers]
    names = [words[1] for words in servers]
    assert len(set(ids)) == len(ids)
    assert len(set(names)) == len(names)


def test_retries_stay_on_the_node_and_timeouts_allow_long_streams(
    config: dict[str, list[str]],
) -> None:
    defaults = config["defaults"]
    assert "retry-on conn-failure empty-response" in defaults
    assert "retries 1" in defaults
    # A redispatched retry walks the ring to a node that is not always the
    # key's next owner, so one key would be downloaded by two nodes.
    assert not any(d.startswith("option redispatch") for d in defaults)
    timeouts = {
        d.split()[1]: d.split()[2] for d in defaults if d.startswith("timeout ")
    }
    assert timeouts["connect"] == "3s"
    assert timeouts["client"] == timeouts["server"] == "5m"
    assert "http-request" in timeouts


def test_stats_and_the_registry_frontend_are_separate(
    config: dict[str, list[str]],
) -> None:
    assert config["frontend stats"][0] == "bind 127.0.0.1:8404"
    assert "bind :5000" in config["frontend registry"]
    assert "default_backend mirror_nodes" in config["frontend registry"]


def test_render_replaces_only_binds_and_servers() -> None:
    shipped = SHIPPED_CONFIG.read_text()
    rendered = render_config(
        shipped,
        bind="127.0.0.1:1",
        stats_bind="127.0.0.1:2",
        servers=[Server("a", 7, "127.0.0.1:3")],
    )
    before = [
        line
        for line in shipped.splitlines()
        if line.split()[:1]
        not in (
            ["bind"],
            ["server"],
        )
    ]
    after = [
        line
        for line in rendered.splitlines()
        if line.split()[:1]
        not in (
            ["bind"],
            ["server"],
        )
    ]
    assert before == after
    assert "    bind 127.0.0.1:1" in rendered
    assert "    bind 127.0.0.1:2" in rendered
    assert [line for line in rendered.splitlines() if "server " in line][-1] == (
        "    server a 127.0.0.1:3 id 7"
    )
    with pytest.raises(ValueError, match="bind"):
        render_config(
            shipped.replace("bind :5000", ""),
            bind="x",
            stats_bind="y",
            servers=[],
        )


# --- the keys, from a running haproxy ----------------------------------------------


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in node: 200 to everything, remembering each request line."""

    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """Health checks in flight when HAProxy stops are reset: not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextlib.contextmanager
def stand_ins(
    count: int,
) -> Iterator[list[tuple[QuietServer, list[str]]]]:
    started = []
    try:
        for _ in range(count):
            seen: list[str] = []
            handler = type("Node", (Recorder,), {"seen": seen})
            server = QuietServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            started.append((server, seen))
        yield started
    finally:
        for server, _ in started:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def balancer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[HaproxyProcess, list[list[str]]]]:
    binary = haproxy()
    with stand_ins(3) as nodes:
        process = HaproxyProcess(
            binary=binary,
            workdir=tmp_path_factory.mktemp("haproxy"),
            servers=[
                Server(f"node{n}", n, f"127.0.0.1:{server.server_address[1]}")
                for n, (server, _) in enumerate(nodes, start=1)
            ],
        )
        process.start()
        try:
            yield process, [seen for _, seen in nodes]
        finally:
            process.stop()


def through(balancer: HaproxyProcess, path: str) -> tuple[str, str]:
    """GET ``path`` through HAProxy; return (key, node) from its log."""
    mark = balancer.mark()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{balancer.url}{path}", timeout=10) as response:
        assert response.status == 200
        response.read()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logged = balancer.requests(mark)
        if logged:
            (request,) = logged
            assert request.uri == path
            return request.key, request.server
        time.sleep(0.02)
    raise AssertionError(f"HAProxy logged no line for {path}")


REPOSITORY_SPELLINGS = {
    "docker.io|library/alpine": [
        "/v2/alpine/manifests/3",
        "/v2/library/alpine/manifests/3",
        "/v2/alpine/manifests/3?ns=docker.io",
        "/v2/library/alpine/tags/list?ns=docker.io&n=10",
        "/v2/docker.io/alpine/manifests/3",
        "/v2/docker.io/library/alpine/manifests/3?ns=docker.io",
        "/v2/index.docker.io/library/alpine/manifests/3",
        "/v2/alpine/manifests/3?ns=registry-1.docker.io",
        f"/v2/library/alpine/referrers/{REFERRED}",
        f"/v2/library/alpine/manifests/{BLOB}",
    ],
    "ghcr.io|owner/app": [
        "/v2/owner/app/manifests/v1?ns=ghcr.io",
        "/v2/owner/app/manifests/v1?ns=GHCR.io",
        "/v2/ghcr.io/owner/app/manifests/v1",
        "/v2/ghcr.io/owner/app/manifests/v1?ns=ghcr.io",
        "/v2/ghcr.io/owner/app/tags/list",
        f"/v2/owner/app/referrers/{REFERRED}?ns=ghcr.io",
    ],
    "localhost:5000|team/app": [
        "/v2/localhost:5000/team/app/manifests/1",
        "/v2/team/app/manifests/1?ns=localhost%3A5000",
    ],
    "docker.io|owner/app": ["/v2/owner/app/manifests/v1"],
}


@pytest.mark.parametrize("key", sorted(REPOSITORY_SPELLINGS))
def test_spellings_of_a_repository_share_one_key_and_node(
    balancer: tuple[HaproxyProcess, list[list[str]]], key: str
) -> None:
    process, _ = balancer
    found = {path: through(process, path) for path in REPOSITORY_SPELLINGS[key]}
    assert {path: k for path, (k, _) in found.items()} == dict.fromkeys(found, key)
    assert len({node for _, node in found.values()}) == 1, found


def test_a_blob_is_keyed_by_its_digest_alone_and_reaches_the_node_unchanged(
    balancer: tuple[HaproxyProcess, list[list[str]]],
) -> None:
    process, seen = balancer
    paths = [
        f"/v2/library/alpine/blobs/{BLOB}",
        f"/v2/owner/app/blobs/{BLOB}?ns=ghcr.io",
        f"/v2/ghcr.io/other/thing/blobs/{BLOB}",
        f"/v2/quay.io/x/y/blobs/{BLOB}?ns=quay.io",
    ]
    found = {path: through(process, path) for path in paths}
    assert {k for k, _ in found.values()} == {BLOB}
    assert len({node for _, node in found.values()}) == 1, found
    received = [path for node in seen for path in node]
    for path in paths:
        assert path in received, f"the node got another path than {path}"


def test_many_keys_spread_over_the_nodes_and_the_rest_is_round_robin(
    balancer: tuple[HaproxyProcess, list[list[str]]],
) -> None:
    process, _ = balancer
    digests = [f"sha256:{n:064x}" for n in range(30)]
    blob_nodes = {through(process, f"/v2/a/b/blobs/{d}")[1] for d in digests}
    assert len(blob_nodes) == 3, blob_nodes
    keyless = [through(process, path) for path in ["/v2/"] * 6 + ["/metrics"] * 3]
    assert {key for key, _ in keyless} == {""}
    assert len({node for _, node in keyless}) == 3, keyless


def test_a_request_to_no_repository_route_gets_no_key(
    balancer: tuple[HaproxyProcess, list[list[str]]],
) -> None:
    process, _ = balancer
    for path in ["/v2/a/blobs/uploads/", "/v2/_catalog", "/readyz"]:
        assert through(process, path)[0] == "", path


# --- Kubernetes: deploy/kubernetes/cluster/ ----------------------------------------

CLUSTER = SHIPPED_CONFIG.parents[1] / "kubernetes" / "cluster"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every document in the directory."""
    found = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"], document["metadata"]["name"]] = document
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def rendered_k8s_config(tmp_path: Path, namespace: str = "ci") -> tuple[str, int]:
    """Run the init container's render script as the pod would; return
    the config it writes and the NODES it was given."""
    found = manifests()
    data = found["ConfigMap", "mirror-haproxy"]["data"]
    (init,) = pod_spec(found["Deployment", "mirror-haproxy"])["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    (tmp_path / "haproxy.cfg").write_text(data["haproxy.cfg"])
    (tmp_path / "render.sh").write_text(data["render.sh"])
    output = tmp_path / "out.cfg"
    done = subprocess.run(
        ["sh", str(tmp_path / "render.sh")],
        env={
            "PATH": "/usr/bin:/bin",
            "NODES": str(env["NODES"]),
            "NAMESPACE": namespace,
            "TEMPLATE": str(tmp_path / "haproxy.cfg"),
            "OUTPUT": str(output),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return output.read_text(), int(str(env["NODES"]))


def test_the_k8s_server_lines_name_every_statefulset_pod(tmp_path: Path) -> None:
    found = manifests()
    nodes = found["StatefulSet", "mirror-node"]
    headless = found["Service", nodes["spec"]["serviceName"]]
    (container,) = pod_spec(nodes)["containers"]
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
    text, count = rendered_k8s_config(tmp_path)
    assert count == nodes["spec"]["replicas"], "NODES must follow the replicas"
    servers = [
        line.split() for line in text.splitlines() if line.startswith("    server ")
    ]
    assert [(words[1], words[2], words[4]) for words in servers] == [
        (
            f"mirror-node-{i}",
            f"mirror-node-{i}.{headless['metadata']['name']}.ci.svc.cluster.local:"
            f"{port}",
            str(i + 1),
        )
        for i in range(count)
    ]
    assert all("resolvers cluster" in " ".join(words) for words in servers)
    # Valid as HAProxy reads it; the names do not resolve here, which
    # init-addr none allows (a warning, not an error).
    config = tmp_path / "out.cfg"
    done = check_config(config)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in line for line in warnings), warnings


def test_the_k8s_haproxy_config_keeps_the_shipped_directives(tmp_path: Path) -> None:
    """Only the binds, the server lines and the resolvers may differ."""
    text, _ = rendered_k8s_config(tmp_path)
    ours, shipped = sections(text), sections(SHIPPED_CONFIG.read_text())

    def kept(directives: list[str]) -> list[str]:
        return [d for d in directives if not d.startswith(("bind ", "server "))]

    assert set(ours) - set(shipped) == {"resolvers cluster"}
    for name in shipped:
        assert kept(ours[name]) == kept(shipped[name]), name
    assert ours["frontend registry"][0] == "bind :5000"


def test_the_k8s_pieces_fit_together() -> None:
    found = manifests()
    nodes = found["StatefulSet", "mirror-node"]
    balancer = found["Deployment", "mirror-haproxy"]
    headless = found["Service", "mirror-nodes"]
    service = found["Service", "mirror"]
    node_labels = nodes["spec"]["template"]["metadata"]["labels"]
    balancer_labels = balancer["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in selector.items())

    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], node_labels)
    assert not selects(headless["spec"]["selector"], balancer_labels)
    assert selects(service["spec"]["selector"], balancer_labels)
    assert not selects(service["spec"]["selector"], node_labels)
    assert selects(nodes["spec"]["selector"]["matchLabels"], node_labels)
    assert not selects(nodes["spec"]["selector"]["matchLabels"], balancer_labels)
    # A volume per pod, mounted where the nodes' config puts the cache.
    (claim,) = nodes["spec"]["volumeClaimTemplates"]
    (container,) = pod_spec(nodes)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    node_config = found["ConfigMap", "mirror-node-config"]["data"]["mirror.toml"]
    assert f'dir = "{mounts[claim["metadata"]["name"]]}"' in node_config
    for workload in (nodes, balancer):
        assert pod_spec(workload)["enableServiceLinks"] is False
    # The Service's port reaches HAProxy's registry frontend.
    (haproxy_container,) = pod_spec(balancer)["containers"]
    ports = {p["name"]: p["containerPort"] for p in haproxy_container["ports"]}
    assert ports == {"http": 5000, "stats": 8404}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
