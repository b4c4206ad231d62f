"""`redact_url`: a URL fit for logs and status output, its password and secret-looking query values hidden.

Examples:

    >>> redact_url("redis://user:hunter2@db:6379/0")
    'redis://user:***@db:6379/0'
    >>> redact_url("rediss://:pw@cache:6380/1?ssl_cert_reqs=none&password=x")
    'rediss://:***@cache:6380/1?ssl_cert_reqs=none&password=***'
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import SecretStr

_SECRET_QUERY_WORDS = ("pass", "secret", "token", "key")


def _masked_userinfo(userinfo: str) -> str:
    """``user:password`` as ``user:***``; a bare user name is kept, unless a raw ``/``, ``?`` or ``#`` shows
    it is no user name (``db/0?password=a`` of ``redis://db/0?password=a@b``): then all of it is hidden."""
    user, colon, _ = userinfo.partition(":")
    if any(c in user for c in "/?#"):
        return "***"
    return f"{user}:***" if colon else userinfo


def _redacted_query(query: str) -> str:
    """``query`` with the values of secret-looking keys (``password``, ``token``, ...) as ``***``."""
    pairs = parse_qsl(query, keep_blank_values=True)
    hidden = [(k, "***" if any(w in k.lower() for w in _SECRET_QUERY_WORDS) else v) for k, v in pairs]
    return urlencode(hidden, safe="*")


def redact_url(url: str | SecretStr | None) -> str:
    """``url`` with its password (and secret-looking query values) replaced by ``***``.

    Everything between ``://`` (or the start) and the last ``@`` is the user info, whatever ``urlsplit``
    makes of it: a password with a raw ``/``, ``?`` or ``#`` (``redis://:pa/ss@db:6379``) is hidden too,
    not cut short and printed as a path or query.
    """
    if url is None:
        return "<unset>"
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    scheme, sep, rest = raw.partition("://")
    userinfo, at, rest = rest.rpartition("@") if sep else raw.rpartition("@")
    try:
        parts = urlsplit(f"{scheme}://{rest}" if sep else f"//{rest}")  # "//": host:port is no scheme
        query = _redacted_query(parts.query) if parts.query else ""
    except ValueError:
        return "<unparsable url>"
    netloc = f"{_masked_userinfo(userinfo)}@{parts.netloc}" if at else parts.netloc
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    if query:
        text += f"?{query}"
    return text
