"""`Settings.from_env` and the connection helpers that read it: no servers needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from cluster.connections import (
    MissingEndpoint,
    minio_client,
    minio_from_endpoint,
    redact_url,
    redis_client,
    redis_from_url,
    redis_tls_options,
)
from schemas.settings import Settings, s3_uses_tls
from trainer.store import ObjectStore, s3_filesystem


def test_empty_environment_gives_defaults_and_no_endpoints() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None and settings.s3_endpoint is None and settings.ray_address is None
    assert settings.bucket == "anomap" and settings.stream_prefix == "anomap" and settings.model_name == "metal"
    assert settings.state_dir == Path(".anomap")


def test_rediss_url_with_acl_user_is_kept_secret_and_gives_a_tls_client() -> None:
    url = "rediss://inspector:hunter2@cache.example:6380/2"
    settings = Settings.from_env({"REDIS_URL": url})
    assert settings.redis_url is not None and settings.redis_url.get_secret_value() == url
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)

    client = redis_client(settings)  # connects lazily: nothing is contacted here
    pool = client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["username"] == "inspector"
    assert pool.connection_kwargs["password"] == "hunter2"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["decode_responses"] is False
    assert pool.connection_kwargs["socket_timeout"] > 0
    client.close()


def test_s3_endpoint_with_a_path_is_rejected_naming_the_variable() -> None:
    with pytest.raises(ValueError, match=r"S3_ENDPOINT must be host:port or http\(s\)://host:port"):
        Settings.from_env({"S3_ENDPOINT": "http://minio:9000/anomap"})


@pytest.mark.parametrize(
    ("env", "host", "secure"),
    [
        ({"S3_ENDPOINT": "minio:9000"}, "minio:9000", False),
        ({"S3_ENDPOINT": "https://s3.example:443/"}, "s3.example:443", True),
        ({"S3_ENDPOINT": "minio:9000", "S3_SECURE": "true"}, "minio:9000", True),
    ],
)
def test_s3_endpoint_scheme_sets_tls_unless_s3_secure_says_otherwise(
    env: dict[str, str], host: str, secure: bool
) -> None:
    settings = Settings.from_env(env)
    assert settings.s3_host == host
    assert settings.s3_secure is secure


def test_s3_keys_are_secret_and_reach_the_client() -> None:
    env = {"S3_ENDPOINT": "127.0.0.1:9", "S3_ACCESS_KEY": "AKIAEXAMPLE", "S3_SECRET_KEY": "wJalrXUtnFEMI"}
    settings = Settings.from_env(env)
    assert "wJalrXUtnFEMI" not in repr(settings)
    client = minio_client(settings)
    assert client._base_url.host == "127.0.0.1:9"  # no request is made


def test_bad_bucket_and_state_dir_from_env() -> None:
    with pytest.raises(ValueError, match="bucket"):
        Settings.from_env({"ANOMAP_BUCKET": "Not_A_Bucket"})
    assert Settings.from_env({"ANOMAP_STATE_DIR": "/var/lib/anomap"}).state_dir == Path("/var/lib/anomap")


def test_missing_endpoints_name_the_variable_to_set(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    with pytest.raises(MissingEndpoint, match=r"REDIS_URL.*anomap stack up"):
        redis_client(settings)
    with pytest.raises(MissingEndpoint, match="S3_ENDPOINT"):
        minio_client(settings)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@db:6379/0", "redis://user:***@db:6379/0"),
        ("rediss://:hunter2@db:6380", "rediss://:***@db:6380"),
        ("redis://db:6379/0", "redis://db:6379/0"),
        ("redis://db:6379/0?password=hunter2&ssl_cert_reqs=none", "redis://db:6379/0?password=***&ssl_cert_reqs=none"),
        (SecretStr("redis://:hunter2@db:1"), "redis://:***@db:1"),
        (None, "<unset>"),
        ("rediss://inspector@db:6380/0", "rediss://inspector@db:6380/0"),
        ("redis://:hunter2@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ],
)
def test_redact_url_hides_passwords(url: str | SecretStr | None, shown: str) -> None:
    assert redact_url(url) == shown


def test_s3_region_is_optional_and_read_from_the_environment() -> None:
    assert Settings.from_env({}).s3_region is None
    assert Settings.from_env({"S3_REGION": "eu-west-3"}).s3_region == "eu-west-3"
    with pytest.raises(ValueError, match="s3_region"):
        Settings.from_env({"S3_REGION": "EU West"})


def test_a_bad_redis_url_or_s3_secure_is_named_and_no_secret_is_shown() -> None:
    with pytest.raises(ValueError, match="REDIS_URL must start with redis://") as info:
        Settings.from_env({"REDIS_URL": "redis//:hunter2@db:6379?password=hunter2"})
    assert "hunter2" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match="S3_SECURE must be one of"):
        Settings.from_env({"S3_SECURE": "maybe"})
    assert Settings.from_env({"S3_SECURE": "on"}).s3_secure is True


def test_the_done_marker_lifetime_is_read_and_bounded() -> None:
    assert Settings.from_env({}).done_ttl_s == 7 * 24 * 3600
    assert Settings.from_env({"ANOMAP_DONE_TTL_S": "86400"}).done_ttl_s == 86400
    with pytest.raises(ValueError, match="ANOMAP_DONE_TTL_S"):
        Settings.from_env({"ANOMAP_DONE_TTL_S": "60"})  # under an hour: redeliveries could score twice


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pa/ss@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://:pa?ss=1@db:6379", "redis://:***@db:6379"),
        ("redis://:pa#ss@db:6379/1", "redis://:***@db:6379/1"),
        ("rediss://user:a/b?c#d@e@cache:6380/2?password=x", "rediss://user:***@cache:6380/2?password=***"),
        ("redis://db/0?password=a@b", "redis://***@b"),  # an @ in the query: hidden rather than guessed at
    ],
)
def test_redact_url_hides_passwords_that_urlsplit_would_cut_short(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(SecretStr(url)) == shown


def test_rediss_checks_the_certificate_hostname_unless_the_url_turns_checks_off() -> None:
    checked = redis_from_url("rediss://:pw@cache.example:6380/0")
    assert checked.connection_pool.connection_kwargs["ssl_check_hostname"] is True
    assert checked.connection_pool.make_connection().check_hostname is True  # built, not connected
    assert redis_tls_options("redis://db:6379/0") == {} and redis_tls_options("unix:///tmp/r.sock") == {}
    unchecked = redis_from_url("rediss://cache.example:6380/0?ssl_cert_reqs=none")
    assert "ssl_check_hostname" not in unchecked.connection_pool.connection_kwargs
    assert unchecked.connection_pool.make_connection().check_hostname is False
    explicit = redis_from_url("rediss://cache.example:6380/0?ssl_check_hostname=false")
    assert explicit.connection_pool.connection_kwargs["ssl_check_hostname"] is False  # the URL's word wins
    plain = redis_from_url("redis://db:6379/0")
    assert "ssl_check_hostname" not in plain.connection_pool.connection_kwargs
    for client in (checked, unchecked, explicit, plain):
        client.close()


def _s3_settings(endpoint: str, **values: object) -> Settings:
    return Settings(
        s3_endpoint=endpoint, s3_access_key=SecretStr("AKIAEXAMPLE"), s3_secret_key=SecretStr("wJal"), **values
    )


@pytest.mark.parametrize(
    ("settings", "tls"),
    [
        (_s3_settings("https://s3.example:443"), True),  # s3_secure left False: the scheme decides
        (_s3_settings("s3.example:443", s3_secure=True), True),
        (
            Settings.from_env({"S3_ENDPOINT": "https://s3.example:443", "S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "b"}),
            True,
        ),
        (_s3_settings("http://minio:9000"), False),
        (_s3_settings("minio:9000"), False),
    ],
)
def test_every_s3_client_agrees_on_tls(settings: Settings, tls: bool) -> None:
    assert settings.s3_tls is tls is s3_uses_tls(settings.s3_endpoint, settings.s3_secure)
    assert ObjectStore.from_settings(settings).client._base_url.is_https is tls  # what Serve uses
    assert minio_client(settings)._base_url.is_https is tls  # what the CLI uses
    assert minio_from_endpoint(settings.s3_endpoint or "", None, None, settings.s3_secure)._base_url.is_https is tls
    assert s3_filesystem(settings).__reduce__()[1][0]["scheme"] == ("https" if tls else "http")  # Ray Train


def test_s3_secure_off_with_an_https_endpoint_is_a_contradiction() -> None:
    with pytest.raises(ValueError, match=r"S3_SECURE=0 contradicts an https:// S3_ENDPOINT"):
        Settings.from_env({"S3_ENDPOINT": "https://s3.example:443", "S3_SECURE": "0"})


@pytest.mark.parametrize(
    "endpoint", ["AKIA:hunter2@minio:9000", "https://AKIA:hunter2@s3.example:443", "http://AKIA:hunter2@minio:9000/x"]
)
def test_s3_endpoint_with_user_info_is_rejected_without_showing_it(endpoint: str) -> None:
    with pytest.raises(ValueError, match="S3_ENDPOINT must be host:port or http") as info:
        Settings.from_env({"S3_ENDPOINT": endpoint})
    assert "without user or password" in str(info.value)
    assert "hunter2" not in str(info.value) and "AKIA" not in str(info.value)
    with pytest.raises(ValueError) as direct:
        Settings(s3_endpoint=endpoint)
    assert "hunter2" not in str(direct.value)
