"""One line for an operator when a service cannot be reached or refuses a command: Redis, the object store, Ray.

    >>> unreachable_message(redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379"))
    'cannot reach Redis (Error 111 connecting to 127.0.0.1:6379); is the stack up (`anomap stack status`) and ...'

None for anything else: `cluster.cli.main` lets those raise. Messages name the endpoint, never a key.
"""

from __future__ import annotations

from cluster.cli_common import first_line

S3_CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken"}
"""S3 error codes that mean the keys are wrong (or lack a permission)."""


def configured_s3_endpoint() -> str:
    """The object store's endpoint as the commands resolve it (for messages; never its keys)."""
    from cluster.connections import resolve_settings

    try:
        endpoint = resolve_settings().s3_endpoint
    except Exception:  # a message about another failure must not fail itself
        endpoint = None
    return endpoint or "(S3_ENDPOINT not set)"


def s3_message(exc: BaseException) -> str | None:
    """One line for an error the object store answered with, naming its code and endpoint, else None."""
    from minio.error import InvalidResponseError, S3Error, ServerError

    from trainer.store import ObjectForbidden

    endpoint = configured_s3_endpoint
    if isinstance(exc, ObjectForbidden) and isinstance(exc.__cause__, S3Error):  # the store's refusal, kept typed
        exc = exc.__cause__
    if isinstance(exc, S3Error):
        hint = "; check S3_ACCESS_KEY and S3_SECRET_KEY" if exc.code in S3_CREDENTIAL_CODES else ""
        return f"the object store at {endpoint()} refused the request: {exc.code}: {exc.message}{hint}"
    if isinstance(exc, ServerError):
        return f"the object store at {endpoint()} failed (HTTP {exc.status_code}): {first_line(exc)}"
    if isinstance(exc, InvalidResponseError):
        return f"the object store at {endpoint()} gave an answer that is not S3's: {first_line(exc)[:200]}"
    return None


def unreachable_message(exc: BaseException) -> str | None:
    """A one-line message when ``exc`` means a service could not be reached or refused us, else None."""
    import redis
    import urllib3.exceptions

    from cluster.connections import RayUnreachable

    if isinstance(exc, redis.exceptions.AuthenticationError):  # a wrong password, or none where one is needed
        return f"Redis refused the credentials ({first_line(exc)}); check the password in REDIS_URL"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"cannot reach Redis ({first_line(exc)}); is the stack up (`anomap stack status`) and REDIS_URL right?"
    if isinstance(exc, urllib3.exceptions.MaxRetryError | urllib3.exceptions.NewConnectionError):
        return (
            f"cannot reach the object store at {configured_s3_endpoint()} ({exc.__class__.__name__}); "
            "check S3_ENDPOINT and `anomap stack status`"
        )
    if isinstance(exc, RayUnreachable):
        return first_line(exc)
    return s3_message(exc)
