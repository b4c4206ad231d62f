"""The whole feedback loop through real servers: noisy model → confirmations → retrain → hot swap → better.

A model trained on normal images of which 30 % carry unlabelled stains scores most held-out stains below
its threshold. The stained images an operator confirms (k = 5, with masks) are filed, `retrain_once`
fine-tunes the live version on Ray Train with them as the discriminator's fakes (γ = 0.3), the
candidate passes the validation gate and is promoted, and the running service — under a steady stream
of jobs the whole time — switches to it with no failed job. The held-out stains then score above
threshold. (What lifts them: the fine-tuned discriminator has learned the confirmed stains as fakes,
and the candidate's map multiplies the residual by its per-cell −log D, `MapMode.RESIDUAL_LOGIT`.)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from cluster.serving import InspectionServer
from schemas import AbnormalPatchSource, Confirmation, ConfirmationLabel, InspectionJob, Settings, StreamNames
from schemas.model_card import MapMode
from trainer.calibration import calibrate
from trainer.config import TrainConfig
from trainer.gan import train_in_process
from trainer.imaging import encode_png
from trainer.model_io import weights_to_bytes
from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card
from trainer.registry import ModelRegistry, new_version_id
from trainer.scoring import PatchModel, anomaly_map
from trainer.store import CheckpointStorage, ObjectStore
from trainer.synthetic import DefectKind, SyntheticDataset, make_dataset, write_dataset_folder
from workers.confirmations import publish_confirmation
from workers.dataset_upload import upload_dataset_folder
from workers.live_models import DEFAULT_REFRESH_S
from workers.publisher import publish_job, upload_image
from workers.results import read_dead_letters, read_results
from workers.retrain import RetrainStatus, retrain_once
from workers.retrain_policy import RetrainPolicy

pytestmark = pytest.mark.ray

SIZE = 128
K_CONFIRMED = 5
BASE = TrainConfig.demo(
    gamma=1.0, discriminator_head="dense", gan_steps=400, encoder_steps=500, num_workers=2, seed=0, detrend_sigma=0.0,
    map_mode="ssim_residual", smoothing_sigma=2.0, line_length=0, short_segment_weight=0.0, blob_radius=0,
)  # fmt: skip
"""The noisy line's first model: plain AnoGAN (γ = 1), P = 32, a dense discriminator (a logit per 8×8 cell).

Not flattened (σ = 0): flattening along x lets even this base model find 6 of the 8 held-out stains on
one CPU (machine B, eleventh session), and the loop under test needs a first model that misses them.

Maps finished with a Gaussian σ = 2, not the demo's line filter: this line's defects are stains, blobs
that a filter along 15 px segments dims. With the line filter the fine-tuned candidate flagged only 2
or 3 of the 5 confirmed stains on machine B (thirteenth session; the gate asks for 4), with the signed
maps and with the twelfth session's `ssim_residual` ones alike."""


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255


def _train_base(registry: ModelRegistry, data: SyntheticDataset) -> str:
    """Train the base model in this process, calibrate it on the clean held-out images, save it, return its version."""
    state = train_in_process(BASE, [_unit(x) for x in data.train_normal], None, device="cpu")
    provisional = build_card(BASE, registry.name, "v-base", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "d", 0, 0)
    model = PatchModel.from_state(provisional, state, device="cpu")
    thresholds = calibrate([anomaly_map(_unit(x), model) for x in data.calibration])
    card = build_card(
        BASE, registry.name, new_version_id(), AbnormalPatchSource.NONE, thresholds, "stained-line",
        len(data.train_normal), 0,
    )  # fmt: skip
    registry.save(card, weights_to_bytes(state))
    registry.set_live(card.version)
    return card.version


@pytest.fixture(scope="module")
def loop_stack(stack_settings: Settings, ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    tag = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(
        update={"bucket": f"loop-{tag}", "stream_prefix": f"loop{tag}", "model_name": "stained"}
    )
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    yield settings, store, tmp_path_factory.mktemp("loop")


def _publish_steadily(
    client: redis.Redis, names: StreamNames, stop: threading.Event, pngs: list[bytes], sent: list[str]
) -> None:
    """A camera on the line: one job a second until ``stop`` (the fine-tune shares the 2 test cores with it)."""
    i = 0
    while not stop.is_set():
        job = InspectionJob(job_id=f"steady-{i:05d}", camera_id="cam-steady")
        publish_job(client, names, job, image=pngs[i % len(pngs)])
        sent.append(job.job_id)
        i += 1
        time.sleep(1.0)


def _score_through_service(
    client: redis.Redis, names: StreamNames, images: list[np.ndarray], tag: str
) -> dict[str, tuple[str, float]]:
    """Publish ``images`` as jobs and wait for their results: job id -> (model version, normalised image score)."""
    ids = [f"{tag}-{i:03d}" for i in range(len(images))]
    for job_id, image in zip(ids, images, strict=True):
        publish_job(client, names, InspectionJob(job_id=job_id, camera_id="cam-check"), image=encode_png(image))
    deadline = time.monotonic() + 120
    found: dict[str, tuple[str, float]] = {}
    while time.monotonic() < deadline and len(found) < len(ids):
        found = {r.job_id: (r.model_version, r.image_score) for _, r in read_results(client, names) if r.job_id in ids}
        time.sleep(0.2)
    assert len(found) == len(ids), f"only {len(found)} of {len(ids)} {tag} jobs came back"
    return found


def test_confirmed_defects_retrain_promote_and_swap_under_load(loop_stack, redis_client: redis.Redis) -> None:
    settings, store, workdir = loop_stack
    names = StreamNames(settings.stream_prefix)
    registry = ModelRegistry(store, settings.model_name)
    stains = (DefectKind.STAIN,)
    data = make_dataset(
        size=SIZE, n_train=20, contamination=0.3, n_abnormal=K_CONFIRMED, n_calibration=6,
        n_test_normal=6, n_test_defect=6, seed=0, kinds=stains,
    )  # fmt: skip
    held_out = make_dataset(
        size=SIZE, n_train=0, n_abnormal=0, n_calibration=0, n_test_normal=0, n_test_defect=8, seed=11, kinds=stains
    )
    write_dataset_folder(data, workdir / "line")
    upload_dataset_folder(store, workdir / "line", "default")  # train/good -> training, test/ -> frozen validation
    base = _train_base(registry, data)

    sent: list[str] = []
    stop = threading.Event()
    steady_pngs = [encode_png(x) for x in data.calibration[:3]]
    with InspectionServer(settings, None, consumers=2, scorer_replicas=2, max_in_flight=2):
        camera = threading.Thread(target=_publish_steadily, args=(redis_client, names, stop, steady_pngs, sent))
        camera.start()
        try:
            before = _score_through_service(redis_client, names, held_out.test_images, "before")
            assert {version for version, _ in before.values()} == {base}
            below = sum(score < 1.0 for _, score in before.values())
            assert below > len(before) / 2, f"the noisy model should miss most stains: {sorted(before.values())}"

            # The operator confirms the stained images the line produced, with their masks.
            confirmed = _score_through_service(redis_client, names, data.abnormal, "stained")
            for i, job_id in enumerate(sorted(confirmed)):
                mask = encode_png(data.abnormal_masks[i].astype(np.uint8) * 255)
                mask_ref = upload_image(store, f"masks/{job_id}.png", mask)
                confirmation = Confirmation(job_id=job_id, label=ConfirmationLabel.ABNORMAL, mask_ref=mask_ref)
                publish_confirmation(redis_client, names, confirmation)

            # γ = 0.3: at 0.5 the candidate reached 1.0 on 5 of 5 confirmed images on one CPU (machine B)
            # and 3 of 5 on another (machine A); at 0.3 on machine A all 5 score 1.21-2.23. 450 + 250 steps
            # (600 + 300 until the twentieth session): on machine A the confirmed stains score 1.24-1.98 and
            # 7 of the 8 held-out ones >= 1, as after 600 + 300 steps, in 60 s of training rather than 120.
            policy = RetrainPolicy(
                min_confirmations=K_CONFIRMED, gamma=0.3, gan_steps=450, encoder_steps=250,
                map_mode=MapMode.RESIDUAL_LOGIT, tolerance=0.1, required_above=0.8,
            )  # fmt: skip
            storage = CheckpointStorage.local(workdir / "train-runs")
            outcome = retrain_once(redis_client, registry, names, storage, policy=policy)
            assert outcome.status == RetrainStatus.PROMOTED, (outcome.reason, outcome.confirmed_scores, outcome.checks)
            new = outcome.candidate_version
            assert registry.live_version() == new
            card = registry.load_card(new)
            assert card.parent_version == base

            time.sleep(DEFAULT_REFRESH_S + 4.0)  # the refresh period, and a slow registry read on a loaded machine
            after = _score_through_service(redis_client, names, held_out.test_images, "after")
        finally:
            stop.set()
            camera.join()
        answers = len(sent) + len(before) + len(confirmed) + len(after)  # every job published on the line
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and redis_client.xlen(names.results()) < answers:
            time.sleep(0.2)

    assert {version for version, _ in after.values()} == {new}
    above = sum(score >= 1.0 for _, score in after.values())
    assert above > len(after) / 2, f"the confirmed kind should now be found: {sorted(after.values())}"
    assert above > len(before) - below
    # Not one job failed or was scored twice while the model changed under the stream.
    assert list(read_dead_letters(redis_client, names)) == []
    steady = [r for _, r in read_results(redis_client, names) if r.job_id.startswith("steady-")]
    assert sorted(r.job_id for r in steady) == sorted(sent)
    assert {r.model_version for r in steady} == {base, new}
