"""``anomap rescore SOURCE [--model VERSION]``: re-score an archive with a model version on Ray Data.

    anomap rescore /data/lot7                         # the live version; a folder of images
    anomap rescore s3://archive/2025/lot7 --model v20261130-101500-000000 --concurrency 4

Writes ``rescore/<version>/maps/…`` and Parquet manifest parts ``rescore/<version>/manifest/`` in the
settings' bucket (`workers.rescore_manifest`); a second run skips what a first one scored. Registered
on the ``anomap`` app by `cluster.cli`.

Exit status: 0 when every listed image is in the manifest (scored, bad or skipped); 1 when some images
could not be scored this time (error rows: run again) or the manifest could not be written; 2 for a
bad source or option, a source without images, a folder that could not be read, a manifest part that
cannot be read, or another run of the same source and version still going (``--force`` takes over a
run that died).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cluster.cli_common import err, fail


def rescore(
    source: Annotated[str, typer.Argument(help="A folder of images (searched recursively) or s3://bucket/prefix.")],
    model: Annotated[str | None, typer.Option(help="Model version (default: the live one).")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Scoring actors (default: as many as the free CPUs hold).")
    ] = None,
    cpus_per_actor: Annotated[float, typer.Option(min=0.01, help="CPUs each scoring actor reserves.")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(min=0, help="GPUs each scoring actor reserves (0: CPU).")] = 0.0,
    torch_threads: Annotated[
        int | None, typer.Option(min=1, max=256, help="torch threads per actor (default: its CPUs, >= 1).")
    ] = None,
    forward_patches: Annotated[
        int | None, typer.Option(min=1, help="Patches per forward pass (default: 128, or 2048 with --gpus-per-actor).")
    ] = None,
    overlays: Annotated[
        str, typer.Option(help="JPEG overlays for: all | anomalous (images at or above the threshold) | none.")
    ] = "anomalous",
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Take over the marker of another run of this source and version (one that died)."),
    ] = False,
) -> None:
    """Re-score an archive: a map per image (an overlay for anomalous ones) and a Parquet manifest row (bad too).

    Resumable: images already in the version's manifest (ok or bad) are skipped.
    """
    from cluster.connections import MissingEndpoint, connect_ray, resolve_settings
    from trainer.registry import ModelNotFound, ModelRegistry
    from trainer.store import ObjectStore
    from workers.archive import ArchiveSource, SourceError
    from workers.rescore import RescoreOptions, RescoreProgress
    from workers.rescore import rescore as run_rescore
    from workers.rescore_lock import RescoreBusy
    from workers.rescore_manifest import OverlayPolicy, check_version
    from workers.rescore_parts import ManifestError, ManifestWriteError

    try:
        overlay_policy = OverlayPolicy(overlays)
    except ValueError:
        fail(f"--overlays must be one of {', '.join(p.value for p in OverlayPolicy)}, got {overlays!r}")
    try:
        settings = resolve_settings()
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        version = check_version(model or ModelRegistry(store, settings.model_name).live_version())
        ArchiveSource.parse(source)  # a missing folder or a bad bucket name: said before Ray starts
        connect_ray(settings)
    except (ValueError, MissingEndpoint, ModelNotFound) as exc:
        fail(str(exc))
    options = RescoreOptions(
        concurrency=concurrency,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        torch_threads=torch_threads,
        forward_patches=forward_patches,
        overlays=overlay_policy,
        force=force,
    )
    bar = Progress(
        TextColumn(f"rescoring with {version}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        transient=False,
    )
    task = bar.add_task("rescore", total=None, info="listing…")

    def show(state: RescoreProgress) -> None:
        info = state.line().split(", ", 1)[-1] if state.done else f"{state.total} to score"
        bar.update(task, total=state.total, completed=state.done, info=info)

    try:
        with bar:
            summary = run_rescore(settings, source, version, options, progress=show)
    except (SourceError, ModelNotFound, ManifestError, RescoreBusy, ValueError) as exc:
        fail(escape(str(exc)))  # paths and keys may hold [brackets]: not markup
    except ManifestWriteError as exc:  # the store refused the manifest: what was recorded is in the message
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if json_out:
        print(json.dumps(summary.as_dict()), flush=True)
    else:
        print(  # one plain line: scripts grep it, and rich would wrap or cut it
            f"{summary.source} with {version}: scored {summary.scored}, bad {summary.bad}, skipped {summary.skipped} "
            f"(already in the manifest), errors {summary.errors}; {summary.images_per_s:.2f} images/s over "
            f"{summary.seconds:.1f} s on {summary.concurrency} actors; manifest parts: {len(summary.manifest_parts)} "
            f"new under s3://{settings.bucket}/rescore/{version}/manifest/",
            flush=True,
        )
    if summary.took_over:
        taken = escape(summary.took_over)
        err.print(f"[yellow]took over the marker of {taken}[/yellow]", highlight=False, soft_wrap=True)
    if summary.errors:
        shown = escape("; ".join(summary.failed[:5]) + (" …" if summary.errors > 5 else ""))
        failed = f"{summary.errors} images could not be read, scored or stored this time"
        err.print(f"[yellow]{failed}; run again to retry them: {shown}[/yellow]", highlight=False, soft_wrap=True)
    if summary.unreadable:
        shown = "; ".join(summary.unreadable[:5]) + (" …" if len(summary.unreadable) > 5 else "")
        fail(
            escape(
                f"{len(summary.unreadable)} folders of {summary.source} could not be read; their images are not "
                f"in this run (fix their permissions, then run again): {shown}"
            )
        )
    if summary.errors:
        raise typer.Exit(1)
