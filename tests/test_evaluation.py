"""Evaluating a model version on a dataset folder: metrics, curves, the HTML report and `anomap eval`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cluster.cli import app
from cluster.connections import redis_from_url
from cluster.eval_report import gallery_cases, write_eval_report
from schemas import AbnormalPatchSource, ModelCard, ModelEventKind, Settings, StreamNames
from trainer.config import TrainConfig
from trainer.evaluation import EvaluationResult, evaluate, pr_curve, roc_curve
from trainer.folder_dataset import DatasetPart, FolderDataset, load_dataset
from trainer.imaging import decode_image, encode_png
from trainer.metrics import aupro, image_auroc, pixel_auroc, pixel_average_precision
from trainer.model_io import weights_to_bytes
from trainer.pipeline import untrained_model
from trainer.postprocess import image_score
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel, anomaly_map
from trainer.store import TRAIN_RUNS_PREFIX, ObjectStore
from trainer.synthetic import DefectKind, make_dataset, write_dataset_folder
from workers.model_events import read_model_events

runner = CliRunner()


def _tiny_model(name: str = "metal") -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """An untrained P = 32 model, calibrated on two clean 64² images."""
    config = TrainConfig(patch_size=32, stride=16, latent_dim=8, base_channels=4, smoothing_sigma=1.0)
    calibration = make_dataset(size=64, n_train=0, n_abnormal=0, n_calibration=2, n_test_normal=0, n_test_defect=0)
    return untrained_model(config, calibration.calibration, name, data_digest="test")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metal")
    kinds = (DefectKind.STAIN, DefectKind.CRACK)
    data = make_dataset(size=64, n_train=2, n_abnormal=0, n_test_normal=3, n_test_defect=4, seed=1, kinds=kinds)
    write_dataset_folder(data, root)
    (root / "ground_truth/crack/001_mask.png").unlink()  # one defect image with its mask unknown
    return root


@pytest.fixture(scope="module")
def evaluated(folder: Path) -> tuple[FolderDataset, ModelCard, EvaluationResult, list[str]]:
    card, state = _tiny_model()
    dataset = load_dataset(folder, DatasetPart.TEST)
    lines: list[str] = []
    result = evaluate(PatchModel.from_state(card, state, device="cpu"), dataset, progress=lines.append)
    return dataset, card, result, lines


def test_metrics_are_in_unit_interval_and_match_the_scores(
    evaluated: tuple[FolderDataset, ModelCard, EvaluationResult, list[str]],
) -> None:
    dataset, card, result, lines = evaluated
    assert set(result.metrics) == {"image_auroc", "pixel_auroc", "pixel_ap", "aupro"}
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
    # recomputed from the dataset itself: each image's own map, labels from the folders, and the pixel
    # metrics over the six images whose mask is known (crack/001's is not), good images as all-normal masks
    model = PatchModel.from_state(card, _tiny_model()[1], device="cpu")
    maps = [anomaly_map(image, model) for image in dataset.test_images]
    labels = [label != "good" for label in dataset.test_labels]
    assert result.metrics["image_auroc"] == pytest.approx(image_auroc([image_score(m) for m in maps], labels))
    known = [(m, mask) for m, mask in zip(maps, dataset.test_masks, strict=True) if mask is not None]
    known_maps, known_masks = [m for m, _ in known], [np.asarray(mask, dtype=bool) for _, mask in known]
    assert len(known) == 6
    assert result.metrics["pixel_auroc"] == pytest.approx(pixel_auroc(known_maps, known_masks))
    assert result.metrics["aupro"] == pytest.approx(aupro(known_maps, known_masks, max_fpr=0.3))
    assert len(result.maps) == 7 and result.maps[0].shape == (64, 64)
    assert result.mask_known.tolist() == [True, True, True, True, False, True, True]  # crack/001 unknown
    assert lines[-1].startswith("evaluated 7/7 images (100 %)")
    counts = result.to_json()["counts"]
    assert counts == {
        "test_images": 7,
        "good": 3,
        "defect": 4,
        "defect_with_mask": 3,
        "pixel_metric_images": 6,
        "per_label": {"crack": 2, "good": 3, "stain": 2},
    }
    assert sum(result.confusion().values()) == 7


def test_metrics_without_both_classes_are_undefined_with_a_reason(folder: Path) -> None:
    card, state = _tiny_model()
    dataset = load_dataset(folder, DatasetPart.TEST)
    good_only = [i for i, label in enumerate(dataset.test_labels) if label == "good"]
    subset = FolderDataset(
        root=folder,
        part=DatasetPart.TEST,
        test_images=[dataset.test_images[i] for i in good_only],
        test_masks=[dataset.test_masks[i] for i in good_only],
        test_labels=[dataset.test_labels[i] for i in good_only],
        test_files=[dataset.test_files[i] for i in good_only],
    )
    result = evaluate(PatchModel.from_state(card, state, device="cpu"), subset)
    assert result.metrics == {}
    assert result.undefined["image_auroc"] == "the test set has only good images"
    assert "no defect pixel" in result.undefined["aupro"]
    assert result.to_json()["metrics"] == dict.fromkeys(("image_auroc", "pixel_auroc", "pixel_ap", "aupro"))


def test_curves_run_from_the_origin_and_match_auroc() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = rng.normal(size=500) + labels
    roc = roc_curve(scores, labels, points=10_000)
    assert (roc.x[0], roc.y[0], roc.x[-1], roc.y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(roc.y, roc.x) == pytest.approx(image_auroc(scores, labels))
    pr = pr_curve(scores, labels, points=50)
    assert pr.x[0] == 0.0 and pr.x[-1] == 1.0 and pr.x.size <= 52
    assert pr.y[-1] == pytest.approx(labels.mean())


def test_thinned_pr_curve_keeps_the_high_precision_part() -> None:
    """400 defect pixels among 400 000: the trade-off sits in the first few thousand ranks, and the
    drawn curve (points spaced along its length) encloses the area AP measures."""
    rng = np.random.default_rng(0)
    labels = np.zeros(400_000, dtype=bool)
    labels[:400] = True
    scores = rng.normal(size=labels.size) + 4.0 * labels
    pr = pr_curve(scores, labels, points=400)
    assert pr.x.size <= 402
    ap = pixel_average_precision([scores.reshape(400, 1000)], [labels.reshape(400, 1000)])
    assert np.trapezoid(pr.y, pr.x) == pytest.approx(ap, abs=0.02)


def test_report_has_curves_histogram_and_gallery(
    evaluated: tuple[FolderDataset, ModelCard, EvaluationResult, list[str]], tmp_path: Path
) -> None:
    dataset, card, result, _ = evaluated
    page = write_eval_report(tmp_path / "report", result, dataset, card).read_text()
    assert page.count("<svg") == 3
    assert page.count('class="curve"') == 4  # image and pixel, ROC and PR
    assert 'class="threshold"' in page and 'class="bar"' in page
    cases = gallery_cases(result)
    assert len(cases) == 7 and len({case.index for case in cases}) == 7  # every image, once
    for source in re.findall(r'<img src="([^"]+)"', page):
        assert (tmp_path / "report" / source).is_file()
    assert "mask unknown" in page  # crack/001.png
    assert "image AUROC" in page and card.version in page


def test_eval_on_an_empty_folder_says_what_is_expected(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--model", "v1", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "is empty" in result.output and "test/" in result.output
    assert "Traceback" not in result.output


def test_eval_on_a_folder_without_test_images_says_so(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "only-train"
    shutil.copytree(folder / "train", root / "train")
    result = runner.invoke(app, ["eval", "--data", str(root)])
    assert result.exit_code == 2
    assert "has no readable test image" in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def s3_env(stack_settings: Settings, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """The environment of a shell pointed at ``object_store``'s bucket."""
    monkeypatch.setenv("S3_ENDPOINT", str(stack_settings.s3_endpoint))
    assert stack_settings.s3_access_key is not None and stack_settings.s3_secret_key is not None
    monkeypatch.setenv("S3_ACCESS_KEY", stack_settings.s3_access_key.get_secret_value())
    monkeypatch.setenv("S3_SECRET_KEY", stack_settings.s3_secret_key.get_secret_value())
    monkeypatch.setenv("ANOMAP_BUCKET", object_store.bucket)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(stack_settings.state_dir))
    return object_store


def test_eval_of_an_unknown_version_names_it(s3_env: ObjectStore, folder: Path) -> None:
    result = runner.invoke(app, ["eval", "--model", "v-nope", "--data", str(folder)])
    assert result.exit_code == 2
    assert "has no version 'v-nope'" in result.output
    assert "Traceback" not in result.output
    for name in ("", "../metal/v1", "a/b"):  # not the live version, nor another prefix's keys
        refused = runner.invoke(app, ["eval", "--model", name, "--data", str(folder)])
        assert refused.exit_code == 2 and "is not a version name" in refused.output, refused.output


def test_eval_writes_json_and_report(s3_env: ObjectStore, folder: Path, tmp_path: Path) -> None:
    card, state = _tiny_model()
    ModelRegistry(s3_env, card.name).save(card, weights_to_bytes(state))
    out = tmp_path / "metrics.json"
    args = ["eval", "--model", card.version, "--data", str(folder), "--json", str(out), "--report", str(tmp_path)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["model"]["version"] == card.version
    assert set(summary["metrics"]) == {"image_auroc", "pixel_auroc", "pixel_ap", "aupro"}
    assert all(0.0 <= value <= 1.0 for value in summary["metrics"].values())
    assert summary["counts"]["test_images"] == 7
    assert summary["model"]["scoring"] == {"score_mode": "encoder", "latent_steps": 0, "card_default": True}
    assert (tmp_path / "index.html").is_file()


def test_eval_of_a_model_whose_maps_are_nan_is_one_line_not_a_traceback(s3_env: ObjectStore, folder: Path) -> None:
    card, state = _tiny_model()
    broken = {
        k: v.fill_(float("nan")) if k.startswith("generator.") and v.is_floating_point() else v
        for k, v in state.items()
    }
    prefix = f"models/{card.name}/{card.version}/"  # written as an older release would have: save() refuses NaN
    s3_env.put_bytes(prefix + "weights.safetensors", weights_to_bytes(broken))
    s3_env.put_bytes(prefix + "card.json", card.model_dump_json().encode(), "application/json")
    result = runner.invoke(app, ["eval", "--model", card.version, "--data", str(folder), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"cannot evaluate metal/{card.version}" in result.output and "NaN" in result.output
    assert "Traceback" not in result.output


def test_eval_refuses_output_paths_it_cannot_write_before_scoring(folder: Path, tmp_path: Path) -> None:
    """A path under a file is refused up front, naming the option (no S3 store is even needed)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for option, path in (("--json", blocker / "out.json"), ("--report", blocker / "report"), ("--report", blocker)):
        result = runner.invoke(app, ["eval", "--data", str(folder), option, str(path)])
        assert result.exit_code == 2, result.output
        assert option in result.output and "a-file" in result.output, result.output
        assert "Traceback" not in result.output


def test_eval_in_search_mode_and_a_bad_mode_is_named(s3_env: ObjectStore, folder: Path, tmp_path: Path) -> None:
    card, state = _tiny_model()
    ModelRegistry(s3_env, card.name).save(card, weights_to_bytes(state))
    out = tmp_path / "search.json"
    args = ["eval", "--model", card.version, "--data", str(folder), "--device", "cpu"]
    searched = runner.invoke(app, [*args, "--score-mode", "search", "--search-steps", "2", "--json", str(out)])
    assert searched.exit_code == 0, searched.output
    summary = json.loads(out.read_text())
    assert set(summary["metrics"]) == {"image_auroc", "pixel_auroc", "pixel_ap", "aupro"}
    assert summary["model"]["scoring"] == {"score_mode": "search", "latent_steps": 2, "card_default": False}
    assert "calibrated for the card's" in searched.output  # its thresholds are the encoder mode's
    bad = runner.invoke(app, [*args, "--score-mode", "guess"])
    assert bad.exit_code == 2
    assert "unknown score mode" in bad.output and "'guess'" in bad.output and "Traceback" not in bad.output


@pytest.mark.ray
def test_train_on_a_folder_then_eval_the_live_version(
    s3_env: ObjectStore,
    stack_settings: Settings,
    ray_cluster: str,
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert stack_settings.redis_url is not None
    monkeypatch.setenv("REDIS_URL", stack_settings.redis_url.get_secret_value())
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    data = make_dataset(size=64, n_train=0, n_abnormal=1, n_calibration=0, n_test_normal=0, n_test_defect=0, seed=5)
    write_dataset_folder(data, root)  # adds train/abnormal/000.png with its mask
    first = root / "train/good/000.png"  # one 16-bit camera image among 8-bit ones: trained on at full precision
    levels = decode_image(first.read_bytes()) * 65535.0 + np.random.default_rng(0).uniform(-100, 100, (64, 64))
    first.write_bytes(encode_png(np.clip(np.rint(levels), 0, 65535).astype(np.uint16)))
    assert load_dataset(root, DatasetPart.TRAIN).train_normal[0].dtype == np.uint16
    flags = ["--schedule", "tiny", "--gamma", "0.9", "--refine-steps", "1"]
    flags += ["--detrend-sigma", "6"]  # the axis is measured on train/good: brushed along x
    trained = runner.invoke(app, ["train", "--data", str(root), *flags])
    assert trained.exit_code == 0, trained.output
    assert "grain along x" in trained.output, "the measured grain is reported"
    version = ModelRegistry(s3_env, "metal").live_version()
    card = ModelRegistry(s3_env, "metal").load_card(version)
    assert not list(s3_env.list_keys(f"{TRAIN_RUNS_PREFIX}/metal-{version}")), (
        "registered: its run's checkpoints are deleted"
    )
    client = redis_from_url(stack_settings.redis_url.get_secret_value())
    events = [event for _, event in read_model_events(client, StreamNames(stack_settings.stream_prefix))]
    assert (events[-1].event, events[-1].version) == (ModelEventKind.PROMOTE, version), "promotions are announced"
    assert card.data_digest == load_dataset(root, DatasetPart.TRAIN).data_digest
    assert card.train_config["refine_steps"] == 1, "the version scores (and was calibrated) with its refinement"
    assert (card.train_config["detrend_sigma"], card.train_config["detrend_axis"]) == (6.0, "x")
    assert (
        card.abnormal_patch_source == AbnormalPatchSource.MASK and card.n_train_images == 2
    )  # calibration/good exists
    assert card.gamma == 0.9 and card.n_abnormal_images == 1 and "abnormal-patch bank" in trained.output
    assert card.thresholds.n_calibration_images > 0 and card.thresholds.pixel > 0
    out = tmp_path / "metrics.json"
    evaluated = runner.invoke(app, ["eval", "--data", str(root), "--json", str(out), "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(out.read_text())["model"]["version"] == version
