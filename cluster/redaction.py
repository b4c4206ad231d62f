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


def redact_url(url: str | SecretStr | None) -> str:
    """``url`` with its password (and secret-looking query values) replaced by ``***``."""
    if url is None:
        return "<unset>"
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        parts = urlsplit(raw)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            hidden = [(k, "***" if any(w in k.lower() for w in _SECRET_QUERY_WORDS) else v) for k, v in pairs]
            query = urlencode(hidden, safe="*")
    except ValueError:
        return "<unparsable url>"
    text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    if query:
        text += f"?{query}"
    return text
