"""Reproduce a race the soak found: a client resetting its connection just as
its blob download starts gets mirror to log an unhandled error.

``RegistryHandlers._stream_download`` calls ``response.prepare()`` before
its ``try``, so the ``ClientConnectionResetError`` aiohttp raises there
(the transport is closing: the client's reset was read, but
``connection_lost``, which cancels the handler, has not run yet) reaches
the error middleware, which logs "unhandled error answering GET ..." with
a traceback. The cached path (``_send_cached``) has ``prepare()`` inside
its ``try`` and is not affected.

Run from the repository root: ``python -m tests.bench.soak.repro_reset``.
A tiny upstream (aiohttp, in this process) answers each blob GET and then
tells the blob's client to reset, 0 to 6 ms later; one client at a time.
Exit status 1 if the mirror logged a traceback (the bug), else 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from .daemon import MirrorSettings, SoakMirror

CLIENTS = 480
BLOB_SIZE = 64 * 1024


async def reproduce() -> int:
    blobs = {}
    for _ in range(CLIENTS):
        data = os.urandom(BLOB_SIZE)
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    sent = {digest: asyncio.Event() for digest in blobs}

    async def blob(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream"}
        )
        response.content_length = len(blobs[digest])
        await response.prepare(request)
        await response.write(blobs[digest])
        sent[digest].set()
        return response

    async def base(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", base)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    workdir = Path(tempfile.mkdtemp(prefix="mirror-repro-"))
    mirror = SoakMirror(
        f"http://127.0.0.1:{port}", workdir, MirrorSettings(log_level="warning")
    )
    await asyncio.to_thread(mirror.start)
    loop = asyncio.get_running_loop()

    async def client(digest: str, delay: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", mirror.port))
            request = f"GET /v2/r/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n"
            await loop.sock_sendall(sock, request.encode())
            await sent[digest].wait()
            await asyncio.sleep(delay)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        finally:
            sock.close()  # with SO_LINGER 0: a reset

    try:
        for number, digest in enumerate(blobs):
            await client(digest, (number % 24) * 0.00025)
        await asyncio.sleep(1.0)
    finally:
        await asyncio.to_thread(mirror.stop)
        await runner.cleanup()
    log = mirror.log_path.read_text()
    tracebacks = log.count("Traceback")
    print(f"{tracebacks} tracebacks for {CLIENTS} resets; log: {mirror.log_path}")
    at = log.find("unhandled error")
    if at >= 0:
        print(log[max(0, at - 30) : at + 1600])
    return 1 if tracebacks else 0


def main() -> int:
    return asyncio.run(reproduce())


if __name__ == "__main__":
    sys.exit(main())
