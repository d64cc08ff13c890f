"""What one request did: the facts its access-log line and its metrics report.

The request middleware starts an `Outcome` per request and makes it current
(a context variable, so it follows the handler's awaits but not tasks it
starts, such as a shared download). The cache notes its result as it looks
things up; the blob handler adds the bytes it sends with sendfile, which the
HTTP layer does not see.
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from dataclasses import dataclass, field

# When one request makes several lookups (a tag, then its manifest), the
# result it reports is the one that says the most: a stale tag served from a
# cached manifest is "stale", a cached tag whose manifest had to be fetched a
# "miss".
_RANK = {"hit": 0, "joined": 1, "miss": 2, "uncached": 3, "stale": 4}


# Request ids need to be unique, not unguessable: a PRNG seeded from the OS
# once, not a system call (os.urandom) per request, which the manifest
# profile showed at 2% of the loop's time.
_ids = random.Random()  # noqa: S311 - see above


def new_request_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


@dataclass(slots=True)
class Outcome:
    id: str = field(default_factory=new_request_id)
    registry: str | None = None
    cache: str | None = None  # a CACHE_RESULTS value; None: no lookup
    sent: int = 0  # body bytes sent outside aiohttp's writer (sendfile)

    def note_cache(self, result: str) -> None:
        if self.cache is None or _RANK[result] >= _RANK[self.cache]:
            self.cache = result


_current: ContextVar[Outcome | None] = ContextVar("mirror_outcome", default=None)


def begin() -> Outcome:
    """A new Outcome, current for the rest of this request's task."""
    outcome = Outcome()
    _current.set(outcome)
    return outcome


def current() -> Outcome | None:
    return _current.get()


def note_cache(registry: str, result: str) -> None:
    """Record a cache lookup's result on the current request, if any."""
    outcome = _current.get()
    if outcome is not None:
        outcome.registry = registry
        outcome.note_cache(result)
