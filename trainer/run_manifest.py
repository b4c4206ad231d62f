"""What a training run was started with, kept beside its checkpoints, so that a run whose driver died can be
resumed (`anomap train --resume VERSION`) only on the same data, with the same options and parent.

    <storage>/metal-v20261202-091500-123456/anomap-run.json     beside Ray Train's checkpoint_* folders
        {"name": "metal", "version": "v20261202-091500-123456", "data_digest": "3f2a…", "n_train_images": 20,
         "n_abnormal_images": 5, "parent_version": null, "train_config": {"gamma": 0.9, "seed": 0, …}}

    >>> earlier.differences(now)
    ['train_config.gamma: 0.9 when the run started, 1.0 now', 'data_digest: 3f2a… when the run started, 9c1e… now']

A registered version's run folders are deleted (`trainer.pipeline`), so `list_runs` shows the runs still
training, the ones whose driver died, and the ones kept on purpose.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from trainer.store import CheckpointStorage

MANIFEST_FILE = "anomap-run.json"
"""The manifest's name inside a run's folder (Ray Train's own files there are ``checkpoint_*``)."""


class RunManifest(BaseModel):
    """The identity of one training run: the version it will register and everything its checkpoints depend on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    data_digest: str
    n_train_images: int
    n_abnormal_images: int
    parent_version: str | None
    train_config: dict[str, Any]
    """`TrainConfig.to_card_dict()`: the schedule, architecture, γ, seed and worker count."""

    @property
    def run_name(self) -> str:
        """The Ray Train run's name, its folder in the checkpoint storage: ``<name>-<version>``."""
        return f"{self.name}-{self.version}"

    @property
    def warmup_run_name(self) -> str:
        """The name of its γ = 1 warm-up run, when it has one."""
        return f"{self.run_name}-warmup"

    def differences(self, now: RunManifest) -> list[str]:
        """What differs between this run's start and ``now``, one ``"field: then, now"`` line each (``[]``: none).
        ``train_config`` is compared key by key."""
        lines = []
        for field in type(self).model_fields:
            if field == "train_config":
                continue
            then, current = getattr(self, field), getattr(now, field)
            if then != current:
                lines.append(f"{field}: {then!r} when the run started, {current!r} now")
        for key in sorted(self.train_config.keys() | now.train_config.keys()):
            then, current = self.train_config.get(key), now.train_config.get(key)
            if then != current:
                lines.append(f"train_config.{key}: {then!r} when the run started, {current!r} now")
        return lines


def manifest_path(storage: CheckpointStorage, run_name: str) -> str:
    """Where run ``run_name``'s manifest is, as a path on ``storage``'s filesystem."""
    return f"{storage.run_path(run_name)}/{MANIFEST_FILE}"


def write_run_manifest(storage: CheckpointStorage, run_name: str, manifest: RunManifest) -> None:
    """Write ``manifest`` into run ``run_name``'s folder (created when local). Raises OSError on failure."""
    filesystem = storage.files()
    if storage.filesystem is None:
        filesystem.create_dir(storage.run_path(run_name), recursive=True)
    with filesystem.open_output_stream(manifest_path(storage, run_name)) as out:
        out.write(manifest.model_dump_json(indent=2).encode())


def read_run_manifest(storage: CheckpointStorage, run_name: str) -> RunManifest | None:
    """The manifest of run ``run_name``, None when it has none. Raises ValueError when it is not a manifest."""
    import pyarrow.fs

    filesystem = storage.files()
    path = manifest_path(storage, run_name)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        return RunManifest.model_validate_json(raw)
    except ValidationError as exc:
        msg = f"{storage}/{run_name}/{MANIFEST_FILE} is not an anomap run manifest: {exc.errors()[0]['msg']}"
        raise ValueError(msg) from exc


def list_runs(storage: CheckpointStorage, name: str) -> list[RunManifest]:
    """The manifests of model ``name``'s runs in ``storage``, oldest version first: after registration a run's
    folder is deleted, so these are the runs that are still training, died, or were kept (``--keep-checkpoints``).
    Folders without a readable manifest (a warm-up's, another model's, one from before manifests) are left out."""
    import pyarrow.fs

    files = storage.files()
    try:
        entries = files.get_file_info(pyarrow.fs.FileSelector(storage.path.rstrip("/"), allow_not_found=True))
    except FileNotFoundError:
        return []
    runs = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith(f"{name}-"):
            continue
        try:
            manifest = read_run_manifest(storage, entry.base_name)
        except ValueError:
            continue
        if manifest is not None and manifest.name == name and entry.base_name == manifest.run_name:
            runs.append(manifest)
    return sorted(runs, key=lambda manifest: manifest.version)
