"""Database and server URLs in messages and tags, with their secrets masked.

A password reaches a URL two ways: as userinfo (`postgresql://user:secret@host/db`, where users
often leave an `@` or `/` in it unescaped) or as a query parameter (`?password=secret`, as libpq
and SQLAlchemy accept). Both are masked; an unescaped `@` is taken as part of the password (the
host follows the last `@` that a host name can follow), so masking errs towards hiding more.
"""

from __future__ import annotations

import re

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pwd|sslpassword|secret|token|access_token)=)([^&;#]*)")
_HOST_AFTER = re.compile(r"[^/?#@\s]*(?::\d*)?(?:[/?#].*)?\Z", re.DOTALL)


def _userinfo_end(rest: str) -> int:
    """Index of the `@` ending a URL's userinfo in `rest` (after `scheme://`), or -1."""
    at = rest.rfind("@")
    while at >= 0 and not _HOST_AFTER.match(rest, at + 1):
        at = rest.rfind("@", 0, at)
    return at


def url_secrets(url: str) -> list[str]:
    """The secrets written in `url`: its userinfo password and secret query values."""
    found = [match.group(2) for match in _SECRET_QUERY.finditer(url) if match.group(2)]
    _, sep, rest = url.partition("://")
    at = _userinfo_end(rest) if sep else -1
    if at >= 0:
        _, colon, password = rest[:at].partition(":")
        if colon and password:
            found.append(password)
    return sorted(set(found), key=len, reverse=True)  # longest first: one secret may contain another


def redact_url(url: str) -> str:
    """`url` with every password and secret query value replaced by ***."""
    text = _SECRET_QUERY.sub(lambda match: match.group(1) + (MASK if match.group(2) else ""), url)
    scheme, sep, rest = text.partition("://")
    at = _userinfo_end(rest) if sep else -1
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            text = f"{scheme}{sep}{user}:{MASK}{rest[at:]}"
    return text


def mask_secrets(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message) with every secret of `url` replaced by ***."""
    for secret in url_secrets(url):
        text = text.replace(secret, MASK)
    return text


def unescaped_password(url: str) -> bool:
    """Whether `url`'s password holds a raw `@` (or `/`): drivers then take part of it for the host
    and echo that part in their errors; it must be percent-encoded (%40, %2F)."""
    _, sep, rest = url.partition("://")
    at = _userinfo_end(rest) if sep else -1
    password = rest[:at].partition(":")[2] if at >= 0 else ""
    return "@" in password or "/" in password
