"""The real entry point (`cluster.cli.main`): a store or server that refuses us is one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import point_cli_at
from pydantic import SecretStr

from cluster.cli import main
from cluster.ports import free_port
from cluster.servers import start_valkey, valkey_url
from schemas import Settings


def _run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``anomap ARGS`` through `main`, in this process; returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["anomap", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    code = exited.value.code
    return code if isinstance(code, int) else 1


def test_a_wrong_s3_secret_is_one_line_naming_the_code_and_endpoint(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """minio's `S3Error` is frozen: Typer's ``app()`` turned it into ``AttributeError: S3Error is frozen``."""
    wrong = "W" * 40
    settings = stack_settings.model_copy(update={"s3_secret_key": SecretStr(wrong)})
    point_cli_at(monkeypatch, settings, stack_settings.bucket, tmp_path)
    assert _run_main(monkeypatch, "models", "list") == 2
    err = capsys.readouterr().err
    assert "error: the object store at " in err and str(stack_settings.s3_endpoint) in err
    assert "SignatureDoesNotMatch" in err and "check S3_ACCESS_KEY and S3_SECRET_KEY" in err
    assert "Traceback" not in err and "frozen" not in err and wrong not in err
    assert len(err.strip().splitlines()) == 1


def test_a_wrong_redis_password_is_one_line(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_valkey(tmp_path / "valkey", password="right-password", die_with_parent=True)
    try:
        url = SecretStr(valkey_url(server, "hunter2"))
        point_cli_at(monkeypatch, stack_settings.model_copy(update={"redis_url": url}), "anomap-x", tmp_path)
        assert _run_main(monkeypatch, "results", "--count", "1") == 2
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "error: Redis refused the credentials" in err and "REDIS_URL" in err
    assert "Traceback" not in err and "hunter2" not in err


def test_an_unreachable_ray_address_is_a_quick_one_line_error(stack_settings: Settings, tmp_path: Path) -> None:
    """``ray.init`` retries a closed address without end: `connect_ray` probes it first."""
    assert stack_settings.redis_url and stack_settings.s3_access_key and stack_settings.s3_secret_key
    closed = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANOMAP_", "RAY_", "REDIS_", "S3_"))}
    env |= {
        "ANOMAP_STATE_DIR": str(tmp_path / "state"),
        "REDIS_URL": stack_settings.redis_url.get_secret_value(),
        "S3_ENDPOINT": str(stack_settings.s3_endpoint),
        "S3_ACCESS_KEY": stack_settings.s3_access_key.get_secret_value(),
        "S3_SECRET_KEY": stack_settings.s3_secret_key.get_secret_value(),
        "ANOMAP_BUCKET": stack_settings.bucket,
        "RAY_ADDRESS": closed,
    }
    args = ["train", "--schedule", "tiny", "--size", "64", "--n-train", "2", "--abnormal-k", "1", "--no-live"]
    code = f"import sys; from cluster.cli import main; sys.argv = ['anomap', *{args!r}]; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: cannot reach Ray at {closed}" in done.stderr and "Traceback" not in done.stderr


def test_an_object_the_store_refuses_is_one_line_naming_the_code() -> None:
    """`ObjectStore.get_bytes` raises `ObjectForbidden` for ``AccessDenied``; the CLI names the store's code."""
    from minio.error import S3Error

    from cluster.cli_failures import s3_message
    from trainer.store import ObjectForbidden

    refused = ObjectForbidden("the store refuses to read s3://b/k: AccessDenied")
    refused.__cause__ = S3Error(None, "AccessDenied", "Access Denied.", "/b/k", "req", "host")  # type: ignore[arg-type]
    message = s3_message(refused)
    assert message is not None and "refused the request: AccessDenied: Access Denied." in message
    assert s3_message(ObjectForbidden("s3://x/k is in bucket 'x'; references may name only ...")) is None
