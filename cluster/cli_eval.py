"""``anomap eval``: a model version's metrics on a folder's test images, as JSON and an HTML report.

    anomap eval --data DIR [--model VERSION] [--json PATH] [--report DIR] [--score-mode encoder|search]

Scores in this process (CUDA when visible) and needs only the object store's registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from cluster.cli_common import console, fail, load_folder, resolved_settings


def eval_cmd(
    data: Annotated[Path, typer.Option(help="Dataset folder with test/good and test/<defect> (method.md §7).")],
    model: Annotated[str | None, typer.Option(help="Model version (default: the live one).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write metrics and counts as JSON here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Folder for the HTML report (index.html + PNGs).")] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if visible, else cpu).")] = None,
    score_mode: Annotated[
        str | None, typer.Option(help="encoder | search (the paper's latent search; slow). Default: the card's.")
    ] = None,
    refine_steps: Annotated[int | None, typer.Option(help="encoder mode: latent refinement steps from E(x).")] = None,
    search_steps: Annotated[int | None, typer.Option(help="search mode: Γ, Adam steps per patch (500).")] = None,
) -> None:
    """Evaluate a model version on a folder's test images: image/pixel AUROC, pixel AP, AUPRO; optional report."""
    check_output_paths(json_path, report)  # before minutes of scoring, not after
    dataset = load_folder(data, "test")
    settings = resolved_settings(s3=True)
    from cluster.connections import object_store
    from trainer.evaluation import evaluate
    from trainer.registry import ModelNotFound, ModelRegistry
    from trainer.scoring import LatentOptions, PatchModel
    from trainer.store import ObjectMissing

    registry = ModelRegistry(object_store(settings), settings.model_name)
    try:
        version = registry.live_version() if model is None else model
        card, weights = registry.load(version)
    except (ModelNotFound, ObjectMissing, ValueError) as exc:  # unknown, half-written or unreadable version
        fail(f"cannot load model {settings.model_name}/{model or 'live'}: {exc}")
    try:
        patch_model = PatchModel.from_safetensors(
            card, weights, device=device, score_mode=score_mode, search_steps=search_steps, refine_steps=refine_steps
        )
    except (ValueError, RuntimeError) as exc:
        fail(f"cannot load model {settings.model_name}/{version}: {exc}")
    latent = patch_model.latent
    card_latent = LatentOptions.for_card(card)
    scoring = {"score_mode": str(latent.mode), "latent_steps": latent.steps, "card_default": latent == card_latent}
    if latent != card_latent:
        console.log(
            f"scoring in mode {latent.mode} with {latent.steps} latent steps, not the card's {card_latent.mode} "
            f"with {card_latent.steps}: the card's thresholds (and the counts at them) were calibrated for the card's"
        )
    console.log(f"evaluating {settings.model_name}/{version} on {len(dataset.test_images)} test images")
    try:
        result = evaluate(patch_model, dataset, progress=console.log)
    except ValueError as exc:  # e.g. a map with NaN values (weights gone bad), or test images the model cannot take
        fail(f"cannot evaluate {settings.model_name}/{version} on {data}: {exc}")
    summary = {
        "model": {"name": card.name, "version": card.version, "scoring": scoring},
        "data": {"root": str(data), "data_digest": dataset.data_digest, "skipped": dataset.warnings},
        **result.to_json(),
    }
    console.print_json(json.dumps(summary))  # first: a file that cannot be written loses no result
    try:
        if json_path is not None:
            json_path.write_text(json.dumps(summary, indent=2) + "\n")
        if report is not None:
            from cluster.eval_report import write_eval_report

            console.log(f"report: {write_eval_report(report, result, dataset, card)}")
    except OSError as exc:
        fail(f"evaluated (metrics above), but could not write the output: {exc}")


def check_output_paths(json_path: Path | None, report: Path | None) -> None:
    """Fail now, naming the path, unless ``--json``'s folder and the ``--report`` folder can be written.

    Creates the folders (as writing would); a path under a file, or a folder without write permission,
    is refused.
    """
    folders = []
    if json_path is not None:
        if json_path.is_dir():
            fail(f"--json {json_path} is a folder; expected a file path")
        folders.append(("--json", json_path, json_path.parent))
    if report is not None:
        if report.exists() and not report.is_dir():
            fail(f"--report {report} is a file; expected a folder path")
        folders.append(("--report", report, report))
    for option, path, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"{option} {path}: cannot create folder {folder}: {exc.strerror or exc}")
        if not os.access(folder, os.W_OK | os.X_OK):
            fail(f"{option} {path}: folder {folder} is not writable")
