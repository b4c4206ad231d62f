"""Training under Ray Train (2 CPU workers, gloo): a worker killed mid-run, the run resumes from its
checkpoints in the S3 store and ends where an uninterrupted run (checkpointing to a local folder) ends,
with un-DDP'd weights; an `anomap train` whose process was killed is finished by `anomap train --resume`.
(A whole model version trained, calibrated and registered: `anomap train` in tests/test_evaluation.py and
the retraining tests.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import ray._private.state as ray_state
import torch
from helpers import point_cli_at
from ray.train import TrainingFailedError
from typer.testing import CliRunner

from cluster.cli import app
from schemas import Settings
from trainer.config import TrainConfig
from trainer.distributed import (
    CHECKPOINT_FILE,
    checkpoint_metadata,
    describe_training_failure,
    load_checkpoint_dir,
    run_training,
)
from trainer.networks import build_networks
from trainer.progress import ProgressWatch
from trainer.registry import ModelRegistry
from trainer.run_claim import RunTaken, claim_training_run
from trainer.store import TRAIN_RUNS_PREFIX, CheckpointStorage, ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(60, 200, (size, size), dtype=np.uint8) for _ in range(n)]


def _alive_actor_pids(class_name: str) -> list[int]:
    """Pids of this cluster's ALIVE actors of ``class_name``, from the GCS actor table.

    (``ray.util.state.list_actors`` needs the dashboard, which the test cluster runs without.)
    """
    table = ray_state.actors(actor_state_name="ALIVE")
    return sorted(info["Pid"] for info in table.values() if info["ActorClassName"] == class_name and info["Pid"])


def _wait_for(condition: Callable[[], Any], deadline: float, what: str) -> Any:
    """Poll ``condition`` every 0.2 s until it returns something truthy (returned) or ``deadline`` passes."""
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _download_checkpoints(store: ObjectStore, run_name: str, into: Path) -> list[Path]:
    """Every checkpoint of ``run_name`` in the S3 store, downloaded ``into`` a folder each."""
    keys = [k for k in store.list_keys(f"{TRAIN_RUNS_PREFIX}/{run_name}/") if k.endswith("/" + CHECKPOINT_FILE)]
    folders = []
    for i, key in enumerate(sorted(keys)):
        folder = into / f"checkpoint-{i}"
        folder.mkdir(parents=True)
        (folder / CHECKPOINT_FILE).write_bytes(store.get_bytes(key))
        folders.append(folder)
    return folders


def test_killed_worker_resumes_from_the_last_checkpoint_in_the_object_store(
    ray_cluster: str, tmp_path: Path, stack_settings: Settings, object_store: ObjectStore
) -> None:
    """SIGKILL one Ray Train worker mid-run: the group restarts, resumes from its last checkpoint in the
    S3 store (weights, Adam states, RNG seed), finishes; its checkpoints are objects in the bucket.

    No sleeps to guess when a checkpoint is safe. Each worker's report queue holds one report and the
    controller only empties it when it polls (every 0.5 s on the test cluster: `LOCAL_RAY_TRAIN_ENV`),
    so ``report(s)`` returns only once ``report(s - spe)`` was collected. Rank 0 posts step ``s`` to the
    board after returning from ``report(s - spe)``, and got past ``report(s - spe)``'s cross-rank barrier
    only once rank 1 had returned from ``report(s - 2·spe)``. So the board showing ``4·spe`` proves both
    ranks' reports of step ``spe`` were collected, i.e. the controller registered a checkpoint at step
    >= spe. The same polling paces the run to about one checkpoint per poll, which leaves the kill
    seconds to land.
    """
    spe = 3
    # 15 checkpoints, about one per 0.5 s poll: the kill at step 12 leaves the run ~5 s to go. Two failures
    # allowed: ours, and one the loaded 2-core CI machine may add on its own (a fresh-clone run once saw
    # the kill land on a group already restarting, and stop there).
    cfg = TrainConfig.tiny(gan_steps=36, encoder_steps=9, steps_per_epoch=spe, max_failures=2)
    run_name = f"test-kill-{uuid.uuid4().hex[:8]}"
    storage = CheckpointStorage.object_store(stack_settings.model_copy(update={"bucket": object_store.bucket}))
    said: list[str] = []
    outcome: dict[str, Any] = {}
    with ProgressWatch(said.append, cfg.total_steps, poll_s=0.2) as board:

        def train() -> None:
            try:
                outcome["state"] = run_training(cfg, _images(2), None, storage, run_name, progress_board=board)
            except BaseException as exc:  # re-raised on the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=train, name="run-training", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            safe_step = 4 * spe
            _wait_for(
                lambda: ray.get(board.read.remote()).get("step", 0) >= safe_step or "error" in outcome,
                deadline,
                f"progress step {safe_step}",
            )
            if "error" in outcome:
                raise outcome["error"]
            before = ray.get(board.read.remote())
            killed_at = before["step"]
            assert killed_at < cfg.total_steps, "the run finished before the kill: make the schedule longer"
            workers = _alive_actor_pids("RayTrainWorker")
            assert len(workers) == cfg.num_workers, workers
            os.kill(workers[-1], signal.SIGKILL)

            thread.join(timeout=max(deadline + 30 - time.monotonic(), 1))
            assert not thread.is_alive(), f"run_training did not finish after the kill; board before it {before}"
            if "error" in outcome:
                raise AssertionError(f"the run failed after the kill; board before it {before}") from outcome["error"]
        finally:
            if thread.is_alive():  # leave nothing running: fail the run, then let it unwind
                for class_name in ("TrainController", "RayTrainWorker"):
                    for pid in _alive_actor_pids(class_name):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                thread.join(timeout=30)
        after = ray.get(board.read.remote())

    assert after["attempts"] > before["attempts"], (before, after)  # the kill restarted the group
    assert any("restarted after a failure" in line for line in said), said  # and the driver said so

    state = outcome["state"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    folders = sorted(
        _download_checkpoints(object_store, run_name, tmp_path),
        key=lambda folder: int(checkpoint_metadata(folder)["step"]),
    )
    steps = [int(checkpoint_metadata(folder)["step"]) for folder in folders]
    # CheckpointConfig(num_to_keep=2) deletes the older registered ones. Rank 0 uploads before it queues
    # its report, so the killed group leaves a few (seen: 1 or 2) that the controller never registered
    # and Ray never deletes: one waiting to be queued, one in the queue, maybe one popped from rank 0 alone.
    failed_groups = after["attempts"] - 1
    assert steps[-2:] == [cfg.total_steps - spe, cfg.total_steps] and len(steps) <= 2 + 3 * failed_groups, steps
    final_folder = folders[-1]
    final = checkpoint_metadata(final_folder)
    assert (final["rng_seed"], final["rng_world_size"]) == (str(cfg.seed), str(cfg.num_workers))
    saved, _ = load_checkpoint_dir(final_folder)
    for optimiser in ("opt_g", "opt_d", "opt_e"):  # Adam moments travel with the weights
        assert any(key.startswith(f"{optimiser}.") and key.endswith(".exp_avg_sq") for key in saved), optimiser
    resumed_from = int(final.get("resumed_from", "0"))  # absent: the run never restarted
    # the last checkpoint registered when the board showed killed_at is at least killed_at - 2·spe
    # (docstring); one spe more of slack for the failure the test allows besides its own
    assert killed_at - 3 * spe <= resumed_from <= killed_at, (resumed_from, killed_at)
    assert resumed_from % spe == 0
    # Resumed, not restarted from scratch: weights, Adam moments and the per-step sampling seeds came
    # back, so the run ends where the same run without a failure ends.
    reference = run_training(cfg, _images(2), None, CheckpointStorage.local(tmp_path / "ref"), f"{run_name}-ref")
    assert state.keys() == reference.keys()
    g, d, e = build_networks(cfg.patch_size, cfg.latent_dim, cfg.base_channels, cfg.spectral_norm)
    for prefix, net in (("generator", g), ("discriminator", d), ("encoder", e)):
        assert {f"{prefix}.{k}" for k in net.state_dict()} <= state.keys(), prefix  # un-DDP'd: no "module."
    assert not any(".module." in key for key in state)
    local = sorted((tmp_path / "ref" / f"{run_name}-ref").rglob(CHECKPOINT_FILE))  # a local folder as storage
    assert local and max(load_checkpoint_dir(f.parent)[1] for f in local) == cfg.total_steps
    differs = {key: float((state[key].float() - reference[key].float()).abs().max()) for key in state}
    assert max(differs.values()) < 1e-4, sorted(differs.items(), key=lambda item: -item[1])[:5]

    # The same run name with another seed and world size cannot resume from these checkpoints: the worker
    # refuses, and the run fails for good with the rank's reason in one line.
    other = cfg.replace(seed=cfg.seed + 1, num_workers=1, max_failures=0)
    with pytest.raises(TrainingFailedError) as failed:
        run_training(other, _images(2), None, storage, run_name)
    reason = describe_training_failure(failed.value)
    refused = f"rank 0: ValueError: checkpoint at step {cfg.total_steps} was taken with seed 0 on 2 workers"
    assert reason.startswith(refused), reason


def test_a_killed_anomap_train_is_finished_by_resume_from_its_last_checkpoint(
    ray_cluster: str,
    stack_settings: Settings,
    object_store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL the `anomap train` process mid-run (its Ray Train run dies with it): the same command with
    ``--resume VERSION`` refuses other options, then continues from the run's last checkpoint in the S3 store
    and registers that version; resuming it again is refused."""
    point_cli_at(monkeypatch, stack_settings, object_store.bucket, tmp_path, redis=False)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    options = ["train", "--synthetic", "--size", "64", "--n-train", "2", "--abnormal-k", "0", "--gamma", "1"]
    options += ["--schedule", "tiny", "--workers", "1", "--gan-steps", "48", "--encoder-steps", "6"]
    options += ["--steps-per-epoch", "3", "--no-live", "--detrend-axis", "x", "--seed", "3"]
    log = tmp_path / "train.log"
    command = [sys.executable, "-c", "from cluster.cli import main; main()", *options]
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=os.environ | {"COLUMNS": "300"}, stdout=out, stderr=out)
        try:
            step = _wait_for(
                lambda: (
                    [int(s) for s in re.findall(r"training step (\d+)/54", log.read_text()) if int(s) >= 9]
                    or proc.poll() is not None
                ),
                time.monotonic() + 120,
                "training step 9 in the log",
            )
            assert proc.poll() is None, f"anomap train ended before the kill:\n{log.read_text()}"
            version = re.findall(r"model version (v[0-9-]+)", log.read_text())[0]
            twice = CliRunner().invoke(app, [*options, "--resume", version])  # while that process still trains it
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert max(step) < 54, text
    found = re.search(r"model version (v[0-9-]+): if this command dies, run it again with --resume \1", text)
    assert found, text
    assert found.group(1) == version
    assert twice.exit_code == 2 and f"training run metal-{version} is being trained by another process" in (
        twice.output
    ), twice.output
    assert version not in ModelRegistry(object_store, "metal").versions()
    left = list(object_store.list_keys(f"{TRAIN_RUNS_PREFIX}/metal-{version}/"))
    assert any(key.endswith("/anomap-run.json") for key in left) and any("/checkpoint_" in key for key in left), left

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "runs", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(run["version"], run["registered"]) for run in json.loads(listed.stdout)["runs"]] == [(version, False)]
    table = runner.invoke(app, ["models", "runs"])  # 80 columns: the version is still shown whole
    assert table.exit_code == 0 and version in table.output and "--resume VERSION" in table.output, table.output
    other = runner.invoke(app, [*options[:-1], "4", "--resume", version])  # another seed
    assert other.exit_code == 2, other.output
    assert "train_config.seed: 3 when the run started, 4 now" in other.output and "Traceback" not in other.output

    resumed = runner.invoke(app, [*options, "--resume", version])
    assert resumed.exit_code == 0, resumed.output
    found = re.search(r"training resumed from its checkpoint at step (\d+)", resumed.output)
    assert found and 3 <= int(found.group(1)) <= max(step), resumed.output
    assert "if this command dies" not in resumed.output  # the version is the one it resumes
    card = ModelRegistry(object_store, "metal").load_card(version)
    assert card.train_config["gan_steps"] == 48 and card.train_config["seed"] == 3
    assert not list(object_store.list_keys(f"{TRAIN_RUNS_PREFIX}/metal-{version}")), "registered: its run is deleted"
    assert "no training runs of model metal" in runner.invoke(app, ["models", "runs"]).output

    again = runner.invoke(app, [*options, "--resume", version])
    assert again.exit_code == 2 and "already trained and registered" in again.output, again.output


def test_a_run_is_claimed_by_one_driver_at_a_time(ray_cluster: str) -> None:
    run_name = f"metal-test-claim-{uuid.uuid4().hex[:8]}"
    taken = f"training run {run_name} is being trained by another process"
    with claim_training_run(run_name), pytest.raises(RunTaken, match=taken), claim_training_run(run_name, wait_s=0.5):
        pass
    with claim_training_run(run_name):  # released: the run can be taken again
        pass
