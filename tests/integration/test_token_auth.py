"""The mirror against an upstream that demands Bearer tokens, like Docker Hub.

The registry answers the mirror's first request with ``401`` and
``WWW-Authenticate: Bearer realm=…,service=…,scope=…``; the mirror must
fetch a token anonymously from the realm, retry, and reuse the token for the
rest of the pull rather than fetching one per request.
"""

from __future__ import annotations

from pathlib import Path

from . import expect
from .conftest import MirrorFactory, Publisher, unique
from .skopeo import Skopeo
from .token_server import SERVICE, TokenServer
from .upstream import Upstream


async def test_pull_through_token_auth_upstream(
    mirror_factory: MirrorFactory,
    token_upstream: Upstream,
    token_server: TokenServer,
    publish: Publisher,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    published = await publish.multiarch(
        unique("library/token-"), flavour="docker", to=token_upstream
    )
    index = published.multi
    reference = f"{published.repository}:{published.tag}"
    mirror = mirror_factory(token_upstream.url)

    mark, tokens = token_upstream.mark(), token_server.mark()
    got = await skopeo.pull_to_dir(
        mirror.host, reference, tmp_path / "first", all_images=True
    )
    assert got.manifest_digest == index.digest
    assert set(got.blobs) == index.blob_digests
    log = await token_upstream.requests_since(mark)
    expect.fetched_once(log, index.blob_digests, context="pull via token auth")
    assert any(r.status == 401 for r in log), (
        f"the registry never challenged; is token auth on?\n{log.describe()}"
    )
    fetched = token_server.requests_since(tokens)
    assert [(t.service, t.scopes) for t in fetched] == [
        (SERVICE, (f"repository:{published.repository}:pull",))
    ], f"expected one token fetch for the repository's pull scope: {fetched}"

    mark, tokens = token_upstream.mark(), token_server.mark()
    again = await skopeo.pull_to_dir(
        mirror.host, reference, tmp_path / "again", all_images=True
    )
    assert again == got
    expect.served_from_cache(
        await token_upstream.requests_since(mark), context="re-pull via token auth"
    )
