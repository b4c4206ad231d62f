"""Where Ray Train checkpoints go (the S3 store or a local folder) and what a checkpoint carries.

No Ray cluster: the filesystem is built and used directly, and checkpoints are written and read by hand.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import pytest
import torch
from pydantic import SecretStr

from schemas import Settings
from trainer.distributed import (
    check_rng_metadata,
    checkpoint_metadata,
    load_checkpoint_dir,
    rng_metadata,
    save_checkpoint_dir,
)
from trainer.store import DEFAULT_S3_REGION, CheckpointStorage, ObjectStore, s3_filesystem

SECRET = "s3cr3t-must-not-show-0123456789abcdefghij"


def _settings(**changes: object) -> Settings:
    values: dict[str, object] = {
        "s3_endpoint": "127.0.0.1:9",
        "s3_access_key": SecretStr("AKIDEXAMPLE"),
        "s3_secret_key": SecretStr(SECRET),
        "bucket": "plant-7",
    }
    return Settings(**(values | changes))


def _filesystem_options(fs: pyarrow.fs.S3FileSystem) -> dict[str, object]:
    return fs.__reduce__()[1][0]  # what pyarrow pickles to Ray's workers


def test_s3_filesystem_follows_the_settings_and_keeps_the_secret_out_of_its_repr() -> None:
    fs = s3_filesystem(_settings(s3_endpoint="https://s3.example:443", s3_region="eu-west-3"))
    options = _filesystem_options(fs)
    assert options["endpoint_override"] == "s3.example:443" and options["scheme"] == "https"
    assert options["region"] == "eu-west-3" and options["access_key"] == "AKIDEXAMPLE"
    assert options["tls_ca_file_path"]  # certificates are checked against a CA bundle
    assert SECRET not in repr(fs) and SECRET not in str(fs)


def test_s3_filesystem_defaults_to_plain_http_and_us_east_1() -> None:
    options = _filesystem_options(s3_filesystem(_settings()))
    assert options["scheme"] == "http" and options["region"] == DEFAULT_S3_REGION


def test_s3_filesystem_needs_an_endpoint() -> None:
    with pytest.raises(ValueError, match="S3_ENDPOINT"):
        s3_filesystem(Settings())


def test_object_store_storage_is_the_train_runs_prefix_of_the_bucket() -> None:
    storage = CheckpointStorage.object_store(_settings())
    assert isinstance(storage.filesystem, pyarrow.fs.S3FileSystem)
    assert storage.path == "plant-7/train-runs" and str(storage) == "s3://plant-7/train-runs"
    assert storage.run_path("metal-v1") == "plant-7/train-runs/metal-v1"
    assert SECRET not in repr(storage)


def test_local_storage_is_an_absolute_directory_without_a_filesystem(tmp_path: Path) -> None:
    storage = CheckpointStorage.local(tmp_path / "runs")
    assert storage.filesystem is None and str(storage) == str((tmp_path / "runs").resolve())


def test_checkpoint_objects_round_trip_through_the_s3_store(
    stack_settings: Settings, object_store: ObjectStore
) -> None:
    storage = CheckpointStorage.object_store(stack_settings.model_copy(update={"bucket": object_store.bucket}))
    assert storage.filesystem is not None
    path = storage.run_path("run-1") + "/checkpoint_0/state.safetensors"
    storage.filesystem.create_dir(path.rsplit("/", 1)[0])
    with storage.filesystem.open_output_stream(path) as out:
        out.write(b"weights")
    assert object_store.get_bytes("train-runs/run-1/checkpoint_0/state.safetensors") == b"weights"


def test_a_checkpoint_carries_weights_optimiser_state_step_and_rng_seed(tmp_path: Path) -> None:
    state = {"generator.w": torch.ones(2, 3), "opt_g.0.exp_avg": torch.zeros(2, 3), "opt_g.0.step": torch.tensor(6.0)}
    save_checkpoint_dir(tmp_path, state, 6, resumed_from=3, extra_metadata=rng_metadata(seed=7, world_size=2))
    loaded, step = load_checkpoint_dir(tmp_path)
    assert step == 6 and loaded.keys() == state.keys()
    metadata = checkpoint_metadata(tmp_path)
    assert metadata["resumed_from"] == "3" and metadata["rng_seed"] == "7" and metadata["rng_world_size"] == "2"
    check_rng_metadata(metadata, seed=7, world_size=2)  # the same run: accepted


@pytest.mark.parametrize(("seed", "world_size"), [(8, 2), (7, 4)])
def test_resuming_with_another_seed_or_world_size_is_refused(seed: int, world_size: int) -> None:
    metadata = {"step": "6"} | rng_metadata(seed=7, world_size=2)
    with pytest.raises(ValueError, match="use a fresh run name"):
        check_rng_metadata(metadata, seed=seed, world_size=world_size)


def test_a_checkpoint_without_rng_metadata_is_still_accepted() -> None:
    check_rng_metadata({"step": "6"}, seed=1, world_size=3)
