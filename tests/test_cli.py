"""The command line: every command is listed, and bad arguments get a message, not a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from trainer.config import map_finish_overrides

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stack", "train", "eval", "serve", "publish", "results", "status", "demo"):
        assert command in result.output


def test_stack_help_lists_up_down_status() -> None:
    result = runner.invoke(app, ["stack", "--help"])
    assert result.exit_code == 0
    for command in ("up", "down", "status"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["train", "--contamination", "1.0"], "--contamination must be in [0, 1)"),
        (["train", "--no-synthetic"], "give exactly one of --synthetic or --data DIR"),
        (["train", "--synthetic", "--data", "."], "give exactly one of --synthetic or --data DIR"),
        (["train", "--data", "no/such/folder"], "no/such/folder is not a folder; expected ROOT/train/good"),
        (["train", "--map-mode", "sharpest"], "map_mode must be one of ['residual', "),
        (["train", "--map-mode", "logit"], "map_mode 'logit' needs discriminator_head='dense'"),
        (["train", "--refine-steps", "-1"], "--refine-steps must be >= 0, got -1"),
        (["train", "--detrend-sigma", "-3"], "detrend_sigma must be a finite number >= 0 (pixels), got -3.0"),
        (["train", "--detrend-axis", "z"], "--detrend-axis must be one of auto, x, y, xy, got 'z'"),
        (["train", "--line-length", "99"], "line_length must be between 0 (off) and 64 pixels, got 99"),
        (["train", "--blob-radius", "17"], "blob_radius must be between 0 (off) and 16 pixels, got 17"),
        (["train", "--short-segment-weight", "1.5"], "short_segment_weight must be between 0 (off) and 1, got 1.5"),
        (["train", "--line-length", "0", "--blob-radius", "3"], "they need line_length > 0, or 0 themselves"),
        (["train", "--synthetic", "--n-train", "0"], "--n-train must be >= 1 (the normal images to train on), got 0"),
        (["train", "--abnormal-k", "-1", "--gamma", "1"], "--abnormal-k must be >= 0, got -1"),
        (["train", "--schedule", "tiny", "--size", "16"], "--size 16 is smaller than one 32 px patch"),
        (["train", "--gan-steps", "-1"], "gan_steps must be >= 0, got -1"),
        (["train", "--gan-steps", "0", "--encoder-steps", "0"], "gan_steps + encoder_steps must be > 0"),
        (["train", "--steps-per-epoch", "0"], "steps_per_epoch must be"),
        (["train", "--resume", "../v1"], "--resume '../v1' is not a model version"),
        (["retrain", "--once", "--workers", "0"], "--workers: Input should be greater than or equal to 1"),
        (["retrain", "--once", "--min-confirmations", "0"], "--min-confirmations: Input should be greater"),
    ],
)
def test_bad_arguments_name_the_problem(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_training_run_that_refuses_its_data_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `ValueError` of the pipeline (data or settings it cannot use) is the CLI's one-line failure, exit 2."""
    import cluster.cli_train as cli_train
    import cluster.connections as connections
    import trainer.pipeline as pipeline
    from schemas import Settings

    def refuse(*args: object, **kwargs: object) -> None:
        msg = "calibration needs at least one held-out normal image"
        raise ValueError(msg)

    monkeypatch.setattr(cli_train, "resolved_settings", lambda **wanted: Settings())  # no stack needed
    monkeypatch.setattr(connections, "connect_ray", lambda *args, **kwargs: "")
    monkeypatch.setattr(connections, "object_store", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "train_model_version", refuse)
    args = ["train", "--schedule", "tiny", "--size", "64", "--n-train", "2", "--abnormal-k", "1", "--no-live"]
    result = runner.invoke(app, [*args, "--storage-path", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "error: training failed: calibration needs at least one held-out normal image" in result.output
    assert "Traceback" not in result.output


def test_a_training_run_that_fails_for_good_names_each_ranks_reason_and_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train gave up (every restart failed): one line with the workers' reasons and the resume command."""
    from ray.train import WorkerGroupError

    import cluster.cli_train as cli_train
    import cluster.connections as connections
    import trainer.pipeline as pipeline
    from schemas import Settings

    def give_up(*args: object, **kwargs: object) -> None:
        failures = {0: OSError("No space left on device"), 1: OSError("No space left on device")}
        raise WorkerGroupError("Training failed due to worker errors: …", failures)

    monkeypatch.setattr(cli_train, "resolved_settings", lambda **wanted: Settings())  # no stack needed
    monkeypatch.setattr(connections, "connect_ray", lambda *args, **kwargs: "")
    monkeypatch.setattr(connections, "object_store", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "train_model_version", give_up)
    args = ["train", "--schedule", "tiny", "--size", "64", "--n-train", "2", "--abnormal-k", "1", "--no-live"]
    result = runner.invoke(app, [*args, "--storage-path", str(tmp_path), "--resume", "v20261202-100000-000001"])
    assert result.exit_code == 2, result.output
    assert "training of metal/v20261202-100000-000001 failed: rank 0, 1: OSError: No space left on device" in (
        result.output
    )
    assert "run the same command with --resume v20261202-100000-000001" in result.output
    assert "Traceback" not in result.output


def test_describing_a_failure_names_distinct_reasons_by_rank() -> None:
    from ray.train import ControllerError, WorkerGroupError

    from trainer.distributed import describe_training_failure

    failures = {1: ValueError("bad\ndetail"), 0: KeyError("k"), 2: ValueError("bad")}
    assert (
        describe_training_failure(WorkerGroupError("…", failures))
        == "rank 0: KeyError: 'k'; rank 1, 2: ValueError: bad"
    )
    controller = ControllerError(RuntimeError("placement group timed out"))
    assert (
        describe_training_failure(controller)
        == "the Ray Train controller failed: RuntimeError: placement group timed out"
    )
    assert describe_training_failure(RuntimeError("first\nsecond")) == "RuntimeError: first"


NO_SHAPES = {"short_segment_weight": 0.0, "blob_radius": 0}


@pytest.mark.parametrize(
    ("line_length", "sigma", "expected"),
    [
        (None, None, {}),  # the schedule's
        (21, None, {"line_length": 21}),
        (0, None, {"line_length": 0, "smoothing_sigma": 2.0, **NO_SHAPES}),  # off: the Gaussian maps of before
        (0, 1.5, {"line_length": 0, "smoothing_sigma": 1.5, **NO_SHAPES}),
        (None, 1.0, {"smoothing_sigma": 1.0}),
    ],
)
def test_map_finish_flags_become_config_overrides(
    line_length: int | None, sigma: float | None, expected: dict[str, object]
) -> None:
    assert map_finish_overrides(line_length, sigma) == expected


def test_the_line_filters_parts_are_flags_of_their_own() -> None:
    assert map_finish_overrides(None, None, 0.0, 5) == {"short_segment_weight": 0.0, "blob_radius": 5}
    assert map_finish_overrides(0, None, None, 3)["blob_radius"] == 3  # given: TrainConfig then refuses it


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["results"], "error: REDIS_URL not set"),  # results need Redis only
        (["train", "--schedule", "tiny", "--size", "64"], "REDIS_URL, S3_ENDPOINT, RAY_ADDRESS not set"),
    ],
)
def test_commands_that_need_a_stack_say_how_to_start_one(
    args: list[str], missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(tmp_path / "state"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert missing in result.output and "anomap stack up" in result.output


def test_unreachable_redis_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cluster.ports import free_port

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "ANOMAP_STATE_DIR": str(tmp_path / "state"),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "S3_ACCESS_KEY": "k",
        "S3_SECRET_KEY": "s",
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    code = "import sys; from cluster.cli import main; sys.argv = ['anomap', 'results', '--count', '1']; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "cannot reach Redis" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_an_unreadable_state_file_is_one_line_not_a_traceback(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "stack.json").write_text('{"bogus": 1}')
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(state_dir))
    result = runner.invoke(app, ["stack", command])
    assert result.exit_code == 2, result.output
    assert "is not a valid stack state file" in result.output and "Traceback" not in result.output
