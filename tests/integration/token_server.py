"""A Docker-Hub-style token service for the distribution registry.

This module owns ``TokenServer``: a token endpoint (like auth.docker.io) that
grants every requested scope, signing RS256 JWTs with a throwaway key whose
self-signed certificate the registry trusts through
``auth.token.rootcertbundle``. Requests without credentials get anonymous
tokens; HTTP Basic credentials must name an account added with
``add_account`` and its password, or the answer is ``401``, as Docker Hub
answers a wrong password. With it the real registry behaves like Docker
Hub towards the mirror: ``401`` with ``WWW-Authenticate: Bearer realm=…,
service=…,scope=…``, then a token fetch, then the retried request.

The server runs in a daemon thread with the standard library's HTTP server,
so it needs no event loop and can live in a session fixture. It records
every token request so tests can check how often the mirror asked.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "mirror-test-registry"
ISSUER = "mirror-test-token-issuer"
TOKEN_TTL = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:library/x:pull,push`` -> a JWT ``access`` entry."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return {"type": kind, "name": name, "actions": actions.split(",")}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token service answered."""

    service: str
    scopes: tuple[str, ...]
    user_agent: str
    account: str = ""
    """The Basic auth user name sent; empty for an anonymous request."""
    granted: bool = True
    """False when the credentials were refused (401)."""


class Signer:
    """An RSA key and self-signed certificate; signs registry JWTs."""

    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self._key, hashes.SHA256())
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def token(self, scopes: list[str], subject: str = "") -> str:
        """A JWT granting ``scopes``, in the shape distribution 2.8 verifies.

        The certificate travels in the ``x5c`` header; the registry checks it
        chains to its root bundle (it is the root) and verifies with its key.
        """
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [
                base64.b64encode(
                    self.certificate.public_bytes(serialization.Encoding.DER)
                ).decode()
            ],
        }
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            # distribution 2.8 decodes "aud" as a single string.
            "aud": SERVICE,
            "exp": now + TOKEN_TTL,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a for a in map(parse_scope, scopes) if a is not None],
        }
        signing_input = (
            b64url(json.dumps(header).encode())
            + "."
            + b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return signing_input + "." + b64url(signature)


@dataclass
class TokenServer:
    """The token endpoint, on a free 127.0.0.1 port in a background thread."""

    workdir: Path
    signer: Signer = field(default_factory=Signer)
    requests: list[TokenRequest] = field(default_factory=list)
    accounts: dict[str, str] = field(default_factory=dict)
    """User name -> password accepted in HTTP Basic credentials."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/token"

    @property
    def cert_path(self) -> Path:
        return self.workdir / "token-root.pem"

    def registry_auth_config(self) -> dict[str, Any]:
        """The ``auth`` section for the registry's config."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self.signer.certificate_pem())
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                query = parse_qs(url.query)
                scopes = [s for value in query.get("scope", []) for s in value.split()]
                account, granted = owner.check(self.headers.get("Authorization"))
                owner.record(
                    TokenRequest(
                        service=query.get("service", [""])[0],
                        scopes=tuple(scopes),
                        user_agent=self.headers.get("User-Agent", ""),
                        account=account,
                        granted=granted,
                    )
                )
                if not granted:
                    # Docker Hub's answer to a wrong user name or password.
                    self.send_json(401, {"details": "incorrect username or password"})
                    return
                token = owner.signer.token(scopes, subject=account)
                self.send_json(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": TOKEN_TTL,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

            def send_json(self, status: int, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                # Requests are recorded structurally; keep pytest output clean.
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def add_account(self, username: str, password: str) -> None:
        """Accept ``username``/``password`` as Basic credentials from now on."""
        with self._lock:
            self.accounts[username] = password

    def check(self, authorization: str | None) -> tuple[str, bool]:
        """``(account, granted)`` for a request's Authorization header.

        No header is an anonymous request, which is granted; Basic
        credentials are granted only for a known account and its password;
        anything else is refused.
        """
        if not authorization:
            return "", True
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return "", False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return "", False
        username, _, password = decoded.partition(":")
        with self._lock:
            known = self.accounts.get(username)
        return username, known is not None and hmac.compare_digest(known, password)

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    def requests_since(self, mark: int) -> list[TokenRequest]:
        with self._lock:
            return self.requests[mark:]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
