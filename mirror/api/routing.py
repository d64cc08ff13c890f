"""Which registry and repository a request is for.

In this order:

1. `?ns=<host>`, which containerd sends to a mirror (the distribution-spec's
   "Registry Proxying"). The registry is the one configured for that host;
   an unconfigured host gets 404 NAME_UNKNOWN. The value is echoed in an
   `OCI-Namespace` response header, as the spec asks of a registry that
   scopes a request by it. If the path also starts with that host (a
   containerd `override_path` mirror URL of `/v2/<host>`), it is dropped.
2. A path prefix, `/v2/<host>/<repository>/...`, when the first component is
   a registry host: for clients that cannot send `ns` (`docker pull
   mirror:5000/ghcr.io/owner/app`, skopeo, crane). A component counts as a
   host only if it has a `.` or a `:` or is `localhost`, Docker's own rule,
   so a configured host without one does not capture Docker Hub namespaces
   of that name; such a registry is reached by `ns` only. An unconfigured
   host gets 404 NAME_UNKNOWN, as for `ns` (no Docker Hub namespace has a
   `.` or a `:`, so Docker Hub is not asked).
3. Otherwise docker.io.

The `library/` normalisation is docker.io's (Registry.repository), and so
is checking the registry's allow/deny rules: a refused repository gets 403
DENIED here, before any work is done.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web
from cachetools import LRUCache

from mirror.config import parse_registry_host
from mirror.errors import NameInvalid, NameUnknown
from mirror.logutil import OncePer
from mirror.reference import names_a_registry
from mirror.registry import Registries, Registry

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "OCI-Namespace"
# Distinct unknown hosts remembered as already logged.
_LOGGED_HOSTS = 1024
# <[scheme://host]/v2/path[?query]>; params
_LINK_RE = re.compile(
    r"\s*<(?:https?://[^/>]*)?/v2/(?P<path>[^?>]*)(?:\?(?P<query>[^>]*))?>(?P<rest>.*)"
)


@dataclass(frozen=True, slots=True)
class Route:
    registry: Registry
    repository: str
    namespace: str | None  # the `ns` the request was scoped by, if any
    prefix: str | None  # the registry host the path started with, if any

    def link(self, link: str) -> str:
        """An upstream `Link` header (tags/list pagination), pointed back at
        this mirror the way the client reached it: with the path prefix and
        the `ns` it used. Upstream's own host, if it names one, is dropped."""
        match = _LINK_RE.match(link)
        if match is None:
            return link
        path, query = match.group("path"), match.group("query")
        if self.prefix is not None:
            path = f"{self.prefix}/{path}"
        if self.namespace is not None:
            extra = urlencode({"ns": self.namespace})
            query = f"{query}&{extra}" if query else extra
        target = f"/v2/{path}" + (f"?{query}" if query else "")
        return f"<{target}>{match.group('rest')}"


ROUTE = web.RequestKey("route", Route)


class Router:
    """Turns a request's `ns` and name into a Route (see the module doc)."""

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self._logged: LRUCache[str, bool] = LRUCache(maxsize=_LOGGED_HOSTS)
        self._log_limit = OncePer(60.0)

    def route(self, request: web.Request) -> Route:
        """The request's Route, also kept on the request for the response's
        headers. Raises NameUnknown (registry not mirrored), NameInvalid,
        RepositoryDenied."""
        name = request.match_info["name"]
        ns = request.query.get("ns")
        first, slash, rest = name.partition("/")
        prefixed = self._prefix(first) if slash else None
        prefix = None
        if ns is not None:
            registry = self.registries.get(ns)
            if registry is None:
                raise self._unknown(ns)
            if prefixed is registry:
                name, prefix = rest, first
        elif prefixed is not None:
            registry, name, prefix = prefixed, rest, first
        elif slash and names_a_registry(first):
            # Docker Hub's namespaces have no `.` or `:`: this names a
            # registry, one not configured. Docker Hub is not asked.
            raise self._unknown(first)
        else:
            if self._prefix(name) is not None:
                raise NameInvalid(
                    "the name is a registry host with no repository after it",
                    {"name": name},
                )
            registry = self.registries.default
        route = Route(registry, registry.repository(name), ns, prefix)
        request[ROUTE] = route
        return route

    def _prefix(self, component: str) -> Registry | None:
        return self.registries.get(component) if names_a_registry(component) else None

    def _unknown(self, ns: str) -> NameUnknown:
        """The error for an `ns` naming no configured registry; logs the host
        once (and at most one such line a minute), so operators see what
        clients ask for."""
        try:
            host: str | None = parse_registry_host(ns) if len(ns) <= 255 else None
        except ValueError:
            host = None
        shown = host or "(not a host name)"
        if shown not in self._logged and self._log_limit.ready():
            self._logged[shown] = True
            if host is None:
                log.warning("a client sent an ns that is not a host name")
            else:  # a host name: safe to log as it is
                log.warning(
                    "a client asked for registry %s, which is not configured; "
                    'to mirror it, add [registries."%s"] to the config file or '
                    "the host to MIRROR_REGISTRIES",
                    host,
                    host,
                )
        return NameUnknown(
            f"registry {shown} is not mirrored here",
            {
                "ns": host,
                "hint": (
                    f'the operator can add [registries."{host}"] to the '
                    "mirror's configuration"
                    if host
                    else "ns must be a registry host name"
                ),
            },
        )


async def echo_namespace(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: echo the `ns` a request was scoped by."""
    route = request.get(ROUTE)
    if route is not None and route.namespace is not None:
        response.headers[NAMESPACE_HEADER] = route.namespace
