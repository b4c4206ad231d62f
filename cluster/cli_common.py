"""What the command modules beside `cluster.cli` share: failing with a message, settings, line and version ids."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from schemas import LINE_PATTERN, Settings
from schemas.ids import MODEL_VERSION_PATTERN

if TYPE_CHECKING:
    from trainer.folder_dataset import FolderDataset

console = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def env_settings() -> Settings:
    """`Settings.from_env`, or exit 2 naming the variable that is wrong."""
    try:
        return Settings.from_env()
    except ValueError as exc:
        fail(str(exc))


def resolved_settings(*, redis: bool = False, s3: bool = False, ray: bool = False) -> Settings:
    """Settings from the environment and a running embedded stack; exit 2 naming what of the wanted is missing."""
    from cluster.connections import resolve_settings

    try:
        settings = resolve_settings()
    except ValueError as exc:
        fail(str(exc))
    missing = [
        name
        for name, wanted, value in (
            ("REDIS_URL", redis, settings.redis_url),
            ("S3_ENDPOINT", s3, settings.s3_endpoint),
            ("RAY_ADDRESS", ray, settings.ray_address),
        )
        if wanted and value is None
    ]
    if missing:
        from cluster.state import read_state

        state = read_state(settings.state_dir)  # readable: resolve_settings read it
        dead = [component.value for component in state.dead_components()] if state is not None else []
        if dead:
            fail(
                f"{', '.join(missing)} not set and the embedded stack's {', '.join(dead)} stopped running: "
                "`anomap stack down`, then `anomap stack up`"
            )
        fail(f"{', '.join(missing)} not set and no embedded stack is up: run `anomap stack up` first")
    return settings


def checked_line(line: str, option: str = "--line") -> str:
    """``line`` if it is a valid line id, else exit 2 saying (for ``option``) what one looks like."""
    if not re.fullmatch(LINE_PATTERN, line):
        fail(f"{option} {line!r} is not a line id: lower-case letters, digits, '_' and '-', at most 32")
    return line


def checked_version(version: str, option: str = "--version") -> str:
    """``version`` if it is a model version name (``../x`` would read other keys), else exit 2 saying so."""
    if not re.fullmatch(MODEL_VERSION_PATTERN, version):
        fail(f"{option} {version!r} is not a model version (letters, digits, '-', '_'; at most 64)")
    return version


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, without a trailing colon (a log tail often follows it)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(":").rstrip()


def load_folder(data: Path, part: str) -> FolderDataset:
    """Load a dataset folder, printing its warnings; a bad folder is a clear message and exit 2."""
    from trainer.folder_dataset import DatasetError, DatasetPart, load_dataset

    try:
        with console.status(f"loading {data}…"):
            dataset = load_dataset(data, DatasetPart(part))
    except DatasetError as exc:
        fail(str(exc))
    for warning in dataset.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    console.log(f"loaded {data}: {json.dumps(dataset.summary())}")
    return dataset
