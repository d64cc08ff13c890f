"""The listener's TLS: contexts from PEM files, reloaded without a restart.

`server_context()` builds what `server.tls_cert`, `server.tls_key` and
`server.client_ca` describe: TLS 1.2 or newer, forward-secret AEAD ciphers
for 1.2 (1.3's suites are all modern), and client certificates required when
a client CA is given.

`ServerTls` keeps the current context for a listener and swaps in a new one
on `reload()` (SIGHUP) or when `watch()` sees the files change on disk (as
cert-manager or an ACME client rotates them). The listening socket keeps one
context for good; each new handshake is moved to the current one from the
server-name callback, which OpenSSL calls for every ClientHello, with or
without SNI. Connections already open keep the certificate they were made
with: a reload drops none. A reload that fails (a file half written, a key
that does not match) is logged and the old certificate stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# TLS 1.2 suites allowed: ECDHE key exchange (forward secrecy) with AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsError(Exception):
    """A certificate, key or CA file that does not load; one line."""


def server_context(
    cert: Path, key: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    """A server context for `cert` (its chain may follow it in the file) and
    `key`. Raises TlsError naming the file and what is wrong with it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"{exc.filename or cert}: no such file") from None
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        reason = exc.reason or str(exc)
        raise TlsError(
            f"{cert} / {key}: not a certificate and its key ({reason})"
        ) from None
    except OSError as exc:
        raise TlsError(f"{exc.filename or cert}: {exc.strerror}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsError(f"{client_ca}: not a PEM CA bundle ({exc.reason})") from None
        except OSError as exc:
            raise TlsError(f"{client_ca}: {exc.strerror}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """What changes when a file is replaced or rewritten (its inode, mtime
    and size); None if it cannot be looked at. Used to notice that a
    watched file (a certificate, an htpasswd file) changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ServerTls:
    """The current TLS context of one listener. Building it loads the
    files (Raises TlsError); `context` is what the listener is given."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        *,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self._files = (cert, key, client_ca)
        self._on_reload = on_reload
        self._current = server_context(cert, key, client_ca)
        self._stamps = self._read_stamps()
        self.context = server_context(cert, key, client_ca)
        self.context.sni_callback = self._switch

    def _read_stamps(self) -> tuple[FileStamp | None, ...]:
        return tuple(file_stamp(p) for p in self._files if p is not None)

    def _switch(
        self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        """Server-name callback: the handshake goes on with the current
        certificate."""
        connection.context = self._current

    def reload(self) -> bool:
        """Load the files again; True if the new certificate is in use."""
        self._stamps = self._read_stamps()
        cert, key, client_ca = self._files
        try:
            context = server_context(cert, key, client_ca)
        except TlsError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            if self._on_reload is not None:
                self._on_reload(False)
            return False
        self._current = context
        log.info("TLS certificate reloaded from %s", cert)
        if self._on_reload is not None:
            self._on_reload(True)
        return True

    async def watch(self, interval: float) -> None:
        """Reload whenever a file changes (its inode, mtime or size); runs
        until cancelled. A change is acted on once the files have been
        still for one interval, so a rotation writing cert and key one
        after the other is loaded as a pair."""
        pending = None
        while True:
            await asyncio.sleep(interval)
            stamps = self._read_stamps()
            if stamps == self._stamps:
                pending = None
            elif stamps == pending:
                self.reload()
                pending = None
            else:
                pending = stamps
