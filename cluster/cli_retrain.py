"""``anomap retrain`` and ``anomap datasets upload``: the retraining controller and the data it needs.

anomap datasets upload DIR --line press-2 [--replace]    # DIR/train/good -> train/good, DIR/test -> validation
anomap retrain --once [--line L ...] [--force] [--json]  # one decision per line: promoted, rejected or skipped
anomap retrain --watch [--interval 300]                  # ... every --interval s until Ctrl-C or SIGTERM

The data lives in the object store under ``datasets/<line>/`` (`workers.retrain_data`); what a run
does is in `workers.retrain`, and the rules it follows in `workers.retrain_policy`.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from cluster.cli_common import checked_line, console, err, fail, resolved_settings
from schemas import StreamNames

if TYPE_CHECKING:
    from trainer.registry import ModelRegistry
    from workers.retrain import RetrainOutcome
    from workers.retrain_policy import RetrainPolicy

datasets_app = typer.Typer(
    help="The lines' training and frozen validation data in the object store.", no_args_is_help=True
)


@datasets_app.command("upload")
def upload_cmd(
    data: Annotated[
        Path, typer.Argument(metavar="DIR", help="A method.md §7 folder: train/good, test/, ground_truth/.")
    ],
    line: Annotated[str, typer.Option(help="The production line the data is for.")] = "default",
    replace: Annotated[bool, typer.Option(help="Replace the line's existing training and validation data.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Upload DIR/train/good as the line's normal training images and DIR/test (+ ground_truth masks) as its
    frozen validation set: datasets/<line>/train/good/ and datasets/<line>/validation/<kind>/."""
    checked_line(line)
    settings = resolved_settings(s3=True)
    from cluster.connections import object_store
    from trainer.folder_dataset import DatasetError
    from workers.dataset_upload import upload_dataset_folder

    store = object_store(settings)
    try:
        summary = upload_dataset_folder(store, data, line, replace=replace)
    except DatasetError as exc:
        fail(str(exc))
    for message in summary.skipped + summary.not_uploaded:
        err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(summary.to_json()), flush=True)
        return
    validation = ", ".join(f"{kind} {n}" for kind, n in summary.validation.items())
    console.print(
        f"line {line}: {summary.train_good} training images, validation {validation} ({summary.masks} masks) "
        f"-> {store.ref(f'datasets/{line}/')}"
        + (f"; removed {summary.removed} old objects" if summary.removed else ""),
        highlight=False,
    )


_POLICY_OPTIONS = {"num_workers": "--workers", "use_gpu": "--gpu"}
"""`RetrainPolicy` fields whose option is not the field's name in kebab case."""


def _policy(**values: Any) -> RetrainPolicy:
    from workers.retrain_policy import RetrainPolicy

    def option(loc: tuple[Any, ...]) -> str:
        field = str(loc[0]) if loc else "?"
        return _POLICY_OPTIONS.get(field, "--" + field.replace("_", "-"))

    try:
        return RetrainPolicy(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        fail("; ".join(f"{option(e['loc'])}: {e['msg']}" for e in exc.errors()))


def _print(outcome: RetrainOutcome, as_json: bool) -> None:
    if as_json:
        print(json.dumps(outcome.to_json()), flush=True)
    else:
        for text in outcome.lines():
            console.print(text, highlight=False, soft_wrap=True)


def _live_after_failure(registry: ModelRegistry, line: str, before: str | None) -> str:
    """What a failed run left live on ``line`` (its pointer was ``before``), in words for the error."""
    try:
        now = registry.own_version(line)
    except Exception:  # the store that broke the run may still be away
        return "and the live model could not be read back"
    if now == before:
        return "the live model is unchanged"
    return f"but {now} is live on the line (its pointer moved before the error; serving follows the pointer)"


def _stop_on_signals() -> threading.Event:
    """An event set by the first SIGINT/SIGTERM; a second one interrupts the run in progress."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.print(f"{signal.Signals(signum).name}: stopping after the run in progress (again to interrupt it)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    return stop


def retrain(
    once: Annotated[bool, typer.Option("--once", help="Decide (and maybe retrain) once per line, then exit.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Check every --interval s until Ctrl-C / SIGTERM.")] = False,
    line: Annotated[
        list[str] | None, typer.Option(help="Production line; repeat for several (default: default).")
    ] = None,
    force: Annotated[bool, typer.Option(help="--once: retrain whatever the counts and the history.")] = False,
    interval: Annotated[float, typer.Option(min=1.0, help="--watch: seconds between checks.")] = 300.0,
    min_confirmations: Annotated[int | None, typer.Option(help="K: new confirmations that trigger a run (5).")] = None,
    period_s: Annotated[
        float | None, typer.Option(help="Also retrain this long after the live version (86400).")
    ] = None,
    tolerance: Annotated[float | None, typer.Option(help="Largest allowed drop of a validation metric (0.02).")] = None,
    required_above: Annotated[
        float | None, typer.Option(help="Share of confirmed abnormal images that must score >= 1.0 (1.0).")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option(help="γ of the fine-tune (default: the parent's if < 1, else 0.8).")
    ] = None,
    schedule_fraction: Annotated[float | None, typer.Option(help="Share of the parent's steps (0.25).")] = None,
    gan_steps: Annotated[int | None, typer.Option(help="GAN steps (default: the fraction of the parent's).")] = None,
    encoder_steps: Annotated[
        int | None, typer.Option(help="Encoder steps (default: the fraction of the parent's).")
    ] = None,
    lr_scale: Annotated[float | None, typer.Option(help="Multiplies the parent's learning rates (1.0).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (default: the parent's).")] = None,
    gpu: Annotated[
        bool | None, typer.Option("--gpu/--no-gpu", help="One GPU per worker (default: the parent's).")
    ] = None,
    map_mode: Annotated[str | None, typer.Option(help="Map mode of the candidate (default: the parent's).")] = None,
    storage_path: Annotated[
        Path | None, typer.Option(help="Ray Train checkpoints here instead of s3://<bucket>/train-runs/.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line and run.")] = False,
) -> None:
    """Fine-tune each line's live model on its confirmed images and promote the result only if it holds up.

    A run starts when >= K new confirmations arrived (or one did and --period-s passed). The candidate
    is evaluated with its parent on the line's frozen validation set (`anomap datasets upload`) and on
    the confirmed abnormal images; it goes live only if no metric drops by more than --tolerance and
    the confirmed defects score above threshold. Every decision is in the candidate's model card and
    on anomap:models. A failed or rejected run leaves the live model as it was.
    """
    if once == watch:
        fail("give exactly one of --once or --watch")
    if force and watch:
        fail("--force goes with --once, not --watch")
    lines = [checked_line(name) for name in line or ["default"]]
    policy = _policy(
        min_confirmations=min_confirmations,
        period_s=period_s,
        tolerance=tolerance,
        required_above=required_above,
        gamma=gamma,
        schedule_fraction=schedule_fraction,
        gan_steps=gan_steps,
        encoder_steps=encoder_steps,
        lr_scale=lr_scale,
        num_workers=workers,
        use_gpu=gpu,
        map_mode=map_mode,
    )
    settings = resolved_settings(redis=True, s3=True)
    if settings.ray_address is None:
        fail("RAY_ADDRESS not set and no embedded stack is up: run `anomap stack up` first")
    from ray.train import TrainingFailedError

    from cluster.connections import connect_ray, object_store, redis_client
    from trainer.distributed import describe_training_failure
    from trainer.registry import ModelRegistry
    from trainer.store import CheckpointStorage
    from workers.retrain import RetrainStatus, retrain_once, watch_retraining

    connect_ray(settings)
    client, names = redis_client(settings), StreamNames(settings.stream_prefix)
    registry = ModelRegistry(object_store(settings), settings.model_name)
    storage = CheckpointStorage.local(storage_path) if storage_path else CheckpointStorage.object_store(settings)
    if watch:
        import logging

        from workers.logs import configure_logging

        configure_logging(logging.INFO)  # a daemon: progress and failures as log lines (ANOMAP_LOG_FORMAT=json)
        stop = _stop_on_signals()
        logging.getLogger("anomap.retrain").info("retraining %s every %g s until Ctrl-C", ", ".join(lines), interval)

        def report(outcome: RetrainOutcome) -> None:
            if as_json or outcome.status is not RetrainStatus.SKIPPED:  # a skip is in the log already
                _print(outcome, as_json)

        watch_retraining(client, registry, names, storage, lines, policy, interval, stop, report)
        return
    failed = False
    for name in lines:
        before: str | None = None
        try:
            before = registry.own_version(name)
            progress = err.log if as_json else console.log
            outcome = retrain_once(client, registry, names, storage, name, policy, force=force, progress=progress)
        except Exception as exc:
            failed = True
            message = f"line {name}: retraining failed, {_live_after_failure(registry, name, before)}: "
            failed_for_good = isinstance(exc, TrainingFailedError)  # its text is every rank's traceback
            message += describe_training_failure(exc) if failed_for_good else f"{exc.__class__.__name__}: {exc}"
            if as_json:
                print(json.dumps({"status": "failed", "line": name, "error": message}), flush=True)
            err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            continue
        _print(outcome, as_json)
    if failed:
        raise typer.Exit(1)
