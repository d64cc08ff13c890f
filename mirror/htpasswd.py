"""htpasswd files of bcrypt hashes: the format distribution and nginx read,
as `htpasswd -B` writes it. Parsing only; checking a password is
mirror.api.clientauth's."""

from __future__ import annotations

from pathlib import Path

_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")


class HtpasswdError(Exception):
    """An htpasswd file that cannot be used; the message is one line."""


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash. Blank lines and `#` comments are skipped.

    Raises HtpasswdError for an unreadable file or a line that is not
    `user:bcrypt-hash` (other hash formats are refused, not ignored: a user
    who cannot log in should hear why at start, not guess).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8"
        raise HtpasswdError(f"{path}: cannot read: {reason}") from None
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        encoded = hashed.strip().encode("ascii", "replace")
        if not sep or not user or not encoded.startswith(_BCRYPT_PREFIXES):
            raise HtpasswdError(
                f"{path}:{number}: not user:bcrypt-hash (write it with htpasswd -B)"
            )
        users[user] = encoded
    return users
