"""FakeRegistry: an in-memory upstream registry with a request log and knobs.

Served by pytest-aiohttp's `aiohttp_server`, it answers the V2 pull endpoints
like Docker Hub does (optionally behind a Bearer token challenge) and records
every request, so tests can assert on what reached upstream. Knobs inject the
faults a mirror must survive: failing statuses, corrupt or truncated blob
bodies, a gate that holds blob bodies mid-stream, manifest bodies sent in two
parts with a pause between them, moved tags.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CHUNK = 64 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    headers: dict[str, str]
    query: str = ""  # the raw query string, as sent

    @property
    def kind(self) -> str:
        """token, base, manifest, blob, tags or other."""
        if self.path == "/token":
            return "token"
        if self.path in ("/v2/", "/v2"):
            return "base"
        for kind in ("manifests", "blobs", "tags"):
            if f"/{kind}/" in self.path:
                return kind.rstrip("s") if kind != "tags" else "tags"
        return "other"


@dataclass
class Image:
    repository: str
    tag: str
    manifest: bytes
    digest: str
    config_digest: str
    layers: list[str]
    media_type: str = OCI_MANIFEST

    @property
    def blobs(self) -> list[str]:
        return [self.config_digest, *self.layers]


@dataclass
class FakeRegistry:
    """An upstream registry in memory. `app()` builds its aiohttp application."""

    auth: bool = False
    # With users, the token service wants Basic credentials from this table.
    users: dict[str, str] | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    # Knobs.
    fail_statuses: list[int] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)
    replace: dict[str, bytes] = field(default_factory=dict)
    truncate: dict[str, int] = field(default_factory=dict)
    truncate_once: dict[str, int] = field(default_factory=dict)
    honour_range: bool = True
    gate: asyncio.Event | None = None
    # Holds every /v2 request before it is answered, until set.
    stall: asyncio.Event | None = None
    # Seconds between the two halves of a manifest body (a slow network).
    manifest_split: float | None = None
    # The token realm's host:port, if not this server's own.
    realm_host: str | None = None
    # "bearer" (the token flow) or "basic" (credentials on every request).
    scheme: str = "bearer"
    # Where blob GETs are redirected (307), like Docker Hub's CDN; see cdn_app.
    cdn_url: str | None = None
    cdn_log: list[Logged] = field(default_factory=list)
    send_digest_header: bool = True
    tokens_issued: int = 0
    # Tokens issued before this number are answered 401 invalid_token.
    tokens_valid_from: int = 0
    token_usernames: list[str | None] = field(default_factory=list)
    # Docker Hub's pull budget: manifest GETs spend one, HEADs none.
    ratelimit: int | None = None
    ratelimit_limit: int = 100
    retry_after: str | None = "30"
    # Without the OCI 1.1 referrers API, GET .../referrers/ is a 404, as
    # distribution 2.8 answers.
    referrers_api: bool = True
    # Like registry.k8s.io: every /v2/ request is answered 307 to this base
    # URL, with `redirect_prefix` put in front of the repository.
    redirect_to: str | None = None
    redirect_prefix: str = ""

    def revoke_tokens(self) -> None:
        self.tokens_valid_from = self.tokens_issued + 1

    # --- content --------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, repository: str, body: bytes, media_type: str, tag: str | None = None
    ) -> str:
        digest = sha256(body)
        self.manifests[digest] = (media_type, body)
        if tag is not None:
            self.tags[(repository, tag)] = digest
        return digest

    def push_image(
        self,
        repository: str,
        tag: str,
        layers: list[bytes],
        *,
        architecture: str = "amd64",
    ) -> Image:
        """Store layers, a config and a manifest; point `tag` at it."""
        config = json.dumps(
            {
                "architecture": architecture,
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256(layer) for layer in layers],
                },
            }
        ).encode()
        config_digest = self.add_blob(config)
        layer_digests = [self.add_blob(layer) for layer in layers]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor(OCI_CONFIG, config_digest, len(config)),
                "layers": [
                    _descriptor(OCI_LAYER, d, len(self.blobs[d])) for d in layer_digests
                ],
            },
            indent=3,  # deliberately unusual: the mirror must not re-serialise
        ).encode()
        digest = self.add_manifest(repository, manifest, OCI_MANIFEST, tag)
        return Image(repository, tag, manifest, digest, config_digest, layer_digests)

    def push_referrer(
        self,
        repository: str,
        subject: Image,
        artifact_type: str,
        payload: bytes = b"signature",
        tag: str | None = None,
    ) -> str:
        """An OCI artifact manifest whose subject is `subject` (a signature,
        an SBOM); `tag` for the tag schema (`sha256-<hex>.sig`)."""
        blob = self.add_blob(payload)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": _descriptor(
                    "application/vnd.oci.empty.v1+json", self.add_blob(b"{}"), 2
                ),
                "layers": [_descriptor(artifact_type, blob, len(payload))],
                "subject": _descriptor(
                    OCI_MANIFEST, subject.digest, len(subject.manifest)
                ),
            }
        ).encode()
        return self.add_manifest(repository, body, OCI_MANIFEST, tag)

    def push_index(self, repository: str, tag: str, images: list[Image]) -> str:
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        **_descriptor(OCI_MANIFEST, i.digest, len(i.manifest)),
                        "platform": {
                            "architecture": json.loads(self.blobs[i.config_digest])[
                                "architecture"
                            ],
                            "os": "linux",
                        },
                    }
                    for i in images
                ],
            }
        ).encode()
        return self.add_manifest(repository, index, OCI_INDEX, tag)

    # --- the request log ------------------------------------------------------

    def count(self, kind: str | None = None, method: str | None = None) -> int:
        return sum(
            1
            for r in self.log
            if (kind is None or r.kind == kind)
            and (method is None or r.method == method)
        )

    def requests(self, kind: str, method: str | None = None) -> list[Logged]:
        return [
            r
            for r in self.log
            if r.kind == kind and (method is None or r.method == method)
        ]

    # --- the server -----------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: object
    ) -> web.StreamResponse:
        self.log.append(
            Logged(
                request.method,
                request.path,
                dict(request.headers),
                request.query_string,
            )
        )
        if self.redirect_to is not None and request.path.startswith("/v2/"):
            rest = request.path_qs.removeprefix("/v2/")
            prefix = self.redirect_prefix if rest else ""
            location = f"{self.redirect_to}/v2/{prefix}{rest}"
            return web.Response(status=307, headers={"Location": location})
        if self.stall is not None and request.path != "/token":
            await self.stall.wait()
        if self.fail_statuses and request.path != "/token":
            status = self.fail_statuses.pop(0)
            return _error(status, "UNAVAILABLE" if status >= 500 else "DENIED")
        if self.auth and request.path.startswith("/v2"):
            denied = self._check_token(request)
            if denied is not None:
                return denied
        assert callable(handler)
        response: web.StreamResponse = await handler(request)
        return response

    def _check_token(self, request: web.Request) -> web.Response | None:
        if self.scheme == "basic":
            if self._basic_user(request) is None:
                challenge = 'Basic realm="fake"'
                return _error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
            return None
        realm = f"{request.scheme}://{self.realm_host or request.host}/token"
        challenge = f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"'
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer token-"):
            return _error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        if int(authorization.removeprefix("Bearer token-")) < self.tokens_valid_from:
            challenge += ',error="invalid_token"'
            return _error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        return None

    def _basic_user(self, request: web.Request) -> str | None:
        """The user named by valid Basic credentials, else None."""
        auth = request.headers.get("Authorization", "")
        try:
            decoded = base64.b64decode(auth.removeprefix("Basic ")).decode()
        except ValueError:
            return None
        username, _, password = decoded.partition(":")
        valid = auth.startswith("Basic ") and (self.users or {}).get(username)
        return username if valid and valid == password else None

    async def _token(self, request: web.Request) -> web.Response:
        username = None
        if self.users is not None:
            username = self._basic_user(request)
            if username is None:
                return _error(401, "UNAUTHORIZED")
        self.token_usernames.append(username)
        self.tokens_issued += 1
        return web.json_response(
            {"access_token": f"token-{self.tokens_issued}", "expires_in": 300}
        )

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name, reference = request.match_info["name"], request.match_info["reference"]
        digest = reference if ":" in reference else self.tags.get((name, reference))
        if digest is None or digest not in self.manifests:
            return _error(404, "MANIFEST_UNKNOWN")
        media_type, body = self.manifests[digest]
        headers = {"Content-Type": media_type, "Content-Length": str(len(body))}
        if self.send_digest_header:
            headers["Docker-Content-Digest"] = digest
        if self.ratelimit is not None:
            if request.method == "GET":
                if self.ratelimit == 0:
                    extra = (
                        {"Retry-After": self.retry_after} if self.retry_after else {}
                    )
                    return _error(429, "TOOMANYREQUESTS", extra)
                self.ratelimit -= 1
            headers["ratelimit-limit"] = f"{self.ratelimit_limit};w=21600"
            headers["ratelimit-remaining"] = f"{self.ratelimit};w=21600"
            headers["docker-ratelimit-source"] = "127.0.0.1"
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if self.manifest_split is not None:
            return await self._send_split(request, body, headers)
        return web.Response(body=body, headers=headers)

    async def _send_split(
        self, request: web.Request, body: bytes, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Headers and half the body, a pause, then the rest."""
        assert self.manifest_split is not None
        response = web.StreamResponse(headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(self.manifest_split)
        await response.write(body[len(body) // 2 :])
        await response.write_eof()
        return response

    def cdn_app(self) -> web.Application:
        """A stand-in for Docker Hub's blob CDN: serves blobs, refuses auth."""
        app = web.Application()
        app.router.add_get("/cdn/{digest}", self._cdn_blob)
        return app

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        self.cdn_log.append(Logged(request.method, request.path, dict(request.headers)))
        if "Authorization" in request.headers:
            return _error(400, "CREDENTIALS_SENT_TO_CDN")
        return await self._send_blob(request, request.match_info["digest"])

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if self.cdn_url is not None and digest in self.blobs:
            raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/cdn/{digest}")
        return await self._send_blob(request, digest)

    async def _send_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN")
        data = self.replace.get(digest, data)
        headers = {"Content-Length": str(len(data)), "Docker-Content-Digest": digest}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        response = web.StreamResponse(headers=headers)
        if self.honour_range and request.headers.get("Range"):
            start = request.http_range.start or 0
            response.set_status(206)
            response.headers["Content-Range"] = (
                f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
        response.content_length = len(data) - start
        await response.prepare(request)
        cut = self.truncate.get(digest, self.truncate_once.pop(digest, None))
        for offset in range(start, len(data), CHUNK):
            if cut is not None and offset >= cut and request.transport is not None:
                request.transport.abort()
                return response
            await response.write(data[offset : offset + CHUNK])
            if offset == start and self.gate is not None:
                await self.gate.wait()
        await response.write_eof()
        return response

    async def _tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tags = sorted(t for (repo, t) in self.tags if repo == name)
        if not tags:
            return _error(404, "NAME_UNKNOWN")
        # Pagination as distribution does it: n tags after `last`, and a Link
        # to the next page while there is one.
        last = request.query.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        headers = {}
        n = request.query.get("n")
        if n is not None and n.isdigit() and len(tags) > int(n):
            tags = tags[: int(n)]
            query = urlencode({"last": tags[-1], "n": n})
            headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        if not self.referrers_api:
            return web.Response(status=404, text="404 page not found\n")
        subject = request.match_info["digest"]
        wanted = request.query.get("artifactType")
        found = []
        for digest, (media_type, body) in sorted(self.manifests.items()):
            doc = json.loads(body)
            if doc.get("subject", {}).get("digest") != subject:
                continue
            kind = doc.get("artifactType") or doc["config"]["mediaType"]
            if wanted is None or kind == wanted:
                found.append(
                    {**_descriptor(media_type, digest, len(body)), "artifactType": kind}
                )
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        headers = {"Content-Type": OCI_INDEX}
        if wanted is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        return web.Response(body=json.dumps(index).encode(), headers=headers)


def _descriptor(media_type: str, digest: str, size: int) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def _error(
    status: int, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"errors": [{"code": code, "message": code.lower(), "detail": None}]},
        status=status,
        headers=headers,
    )
