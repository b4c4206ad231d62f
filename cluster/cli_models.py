"""``anomap models``: model versions for people.

anomap models list [--line L] [--json]          # versions, created, parent, γ, metrics; which is live where
anomap models promote VERSION [--line L]        # make a version live (and announce it on anomap:models)
anomap models rollback [--line L]               # back to the version live before the current one
anomap models runs [--storage-path DIR] [--json] # training runs not (yet) registered: what to --resume

A line without a pointer of its own follows the default line's model; `rollback` on such a line,
after its first promotion, makes it follow the default again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cluster.cli_common import checked_line, console, fail, resolved_settings
from schemas import ModelEvent, Settings, StreamNames

if TYPE_CHECKING:
    from trainer.registry import ModelRegistry

models_app = typer.Typer(
    help="Model versions: list them, promote one, roll back; training runs to resume.", no_args_is_help=True
)

LineOption = Annotated[str, typer.Option(help="Production line (its own pointer; else the default's).")]
ReasonOption = Annotated[str, typer.Option(help="Why, for the history and the anomap:models event.")]


def _registry(settings: Settings) -> ModelRegistry:
    from cluster.connections import object_store
    from trainer.registry import ModelRegistry

    return ModelRegistry(object_store(settings), settings.model_name)


def _metrics_summary(metrics: dict[str, float], limit: int = 4) -> str:
    return ", ".join(f"{key}={value:.3f}" for key, value in sorted(metrics.items())[:limit])


def versions_document(registry: ModelRegistry, line: str | None) -> dict[str, Any]:
    """What `list` shows: every version with its card's summary, and the live version per line. A version whose
    card cannot be read (corrupt, or another version's copied under this name) is listed with its ``problem``."""
    from trainer.registry import ModelNotFound

    pointers = registry.live_pointers()
    if line is not None:
        try:
            live = {line: registry.live_version(line)}
        except ModelNotFound:
            live = {}
    else:
        live = pointers
    versions = []
    for version in registry.versions():
        live_on = sorted(name for name, live_version in live.items() if live_version == version)
        try:
            card = registry.load_card(version)
        except (ModelNotFound, ValueError) as exc:  # ValueError: a card that does not parse or is not this version's
            versions.append({"version": version, "problem": str(exc)[:500], "live_on": live_on})
            continue
        versions.append(
            {
                "version": version,
                "created_at": card.created_at.isoformat(),
                "parent_version": card.parent_version,
                "gamma": card.gamma,
                "n_abnormal_images": card.n_abnormal_images,
                "metrics": card.metrics,
                "retrained": None
                if card.retraining is None
                else {"line": card.retraining.line, "decision": str(card.retraining.decision)},
                "live_on": live_on,
            }
        )
    document: dict[str, Any] = {"model": registry.name, "live": live, "versions": versions}
    if line is not None:
        document["follows_default"] = line != "default" and line not in pointers
    return document


@models_app.command("list")
def list_cmd(
    line: Annotated[str | None, typer.Option(help="Only show which version is live on this line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Model versions, oldest first: created, parent, γ, the retraining decision, metrics, and where each is live."""
    settings = resolved_settings(s3=True)
    document = versions_document(_registry(settings), None if line is None else checked_line(line))
    if as_json:
        print(json.dumps(document), flush=True)
        return
    table = Table(title=f"model {document['model']}")
    for column in ("version", "created", "parent", "γ", "abnormal", "retrained", "metrics", "live on"):
        table.add_column(column)
    for row in document["versions"]:
        live_on = ", ".join(row["live_on"])
        if live_on and document.get("follows_default"):
            live_on += " (via default)"
        if "problem" in row:
            table.add_row(row["version"], "[red]unreadable card[/red]", "-", "-", "-", "-", row["problem"], live_on)
            continue
        table.add_row(
            row["version"],
            row["created_at"][:19].replace("T", " "),
            row["parent_version"] or "-",
            f"{row['gamma']:g}",
            str(row["n_abnormal_images"]),
            f"{row['retrained']['decision']} ({row['retrained']['line']})" if row["retrained"] else "-",
            _metrics_summary(row["metrics"]) or "-",
            live_on,
        )
    console.print(table)
    if not document["live"]:
        console.print("no version is live yet" + (f" on line {line}" if line else ""))


def _print_event(event: ModelEvent, default_version: str | None) -> None:
    def shown(version: str | None) -> str:
        return version if version is not None else f"the default line's model ({default_version or 'none'})"

    moved = f"{shown(event.previous)} → {shown(event.version)}"
    console.print(f"{event.event.value}: model {event.name} on line {event.line}: {moved}", highlight=False)


def _move(line: str, version: str | None, reason: str) -> None:
    settings = resolved_settings(redis=True, s3=True)
    checked_line(line)
    from cluster.connections import redis_client
    from trainer.registry import ModelNotFound, NothingToRollBack
    from workers.model_events import ModelEventNotAnnounced, PointersBusy, promote_model, rollback_model

    registry = _registry(settings)
    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    try:
        if version is not None:
            event = promote_model(registry, client, names, version, line, reason)
        else:
            event = rollback_model(registry, client, names, line, reason)
    except (ModelNotFound, NothingToRollBack, ValueError) as exc:  # ValueError: not a version name
        fail(str(exc))
    except PointersBusy as exc:
        fail(f"{exc}; run the command again")
    except ModelEventNotAnnounced as exc:
        _print_event(exc.event, registry.own_version("default"))
        fail(str(exc))
    if not event.changed:
        console.print(f"{version} is already live on line {line}; nothing changed", highlight=False)
        return
    _print_event(event, registry.own_version("default"))


@models_app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="The version to make live (see `anomap models list`).")],
    line: LineOption = "default",
    reason: ReasonOption = "promoted by hand",
) -> None:
    """Make VERSION live on a line, record it in the pointer's history and announce it on anomap:models."""
    _move(line, version, reason)


@models_app.command("rollback")
def rollback_cmd(line: LineOption = "default", reason: ReasonOption = "rolled back by hand") -> None:
    """Point a line back at the version that was live before the current one (exit 2 if there is none)."""
    _move(line, None, reason)


@models_app.command("runs")
def runs_cmd(
    storage_path: Annotated[
        Path | None, typer.Option(help="The --storage-path the runs were started with (default: the object store).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Training runs whose checkpoints are still kept: running, dead (resume them with `anomap train <the same
    options> --resume VERSION`), or kept with --keep-checkpoints. A registered version's run is deleted."""
    from trainer.run_manifest import list_runs
    from trainer.store import CheckpointStorage

    settings = resolved_settings(s3=True)
    storage = CheckpointStorage.local(storage_path) if storage_path else CheckpointStorage.object_store(settings)
    try:
        runs = list_runs(storage, settings.model_name)
    except OSError as exc:
        fail(f"cannot list the training runs in {storage}: {exc}")
    registered = set(_registry(settings).versions())
    rows = [
        {
            "version": run.version,
            "registered": run.version in registered,
            "parent_version": run.parent_version,
            "gamma": run.train_config.get("gamma"),
            "seed": run.train_config.get("seed"),
            "n_train_images": run.n_train_images,
            "n_abnormal_images": run.n_abnormal_images,
            "data_digest": run.data_digest,
        }
        for run in runs
    ]
    if as_json:
        print(json.dumps({"model": settings.model_name, "storage": str(storage), "runs": rows}), flush=True)
        return
    if not rows:
        console.print(f"no training runs of model {settings.model_name} in {storage}")
        return
    table = Table(title=f"training runs of model {settings.model_name} in {storage}")
    table.add_column("version", no_wrap=True, min_width=max(len(row["version"]) for row in rows))  # never cut
    for column in ("registered", "parent", "γ", "seed", "images", "abnormal", "data"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["version"],
            "yes" if row["registered"] else "no",
            row["parent_version"] or "-",
            f"{row['gamma']:g}" if isinstance(row["gamma"], int | float) else "-",
            str(row["seed"]),
            str(row["n_train_images"]),
            str(row["n_abnormal_images"]),
            row["data_digest"][:12],
        )
    console.print(table)
    if not all(row["registered"] for row in rows):
        console.print(
            "resume a run that is not registered: anomap train <the options it started with> --resume VERSION"
        )
