"""``anomap dead list`` and ``anomap dead redrive``: the dead letters an operator reads and sends again.

anomap dead list                                   # the latest 50, with reason, job, entry and detail
anomap dead list --reason missing_object --json    # one JSON dead letter per line (with its dead_id)
anomap dead redrive --reason missing_object        # after the objects were uploaded: score those jobs again
anomap dead redrive --job cam01-7 --dry-run        # what would be sent again, nothing written

`workers.dead_letters` does the reading and the one-step re-drive; this module only chooses and prints.
"""

from __future__ import annotations

import json
from typing import Annotated

import redis
import typer

from cluster.cli_common import checked_line, console, err, fail, resolved_settings
from schemas import DeadLetter, DeadReason, StreamNames

dead_app = typer.Typer(
    help="Dead letters: list them, and re-drive them once their cause is fixed.", no_args_is_help=True
)

ReasonOption = Annotated[
    list[str] | None, typer.Option("--reason", help="Only this reason (repeatable), e.g. missing_object.")
]
LineOption = Annotated[list[str] | None, typer.Option("--line", help="Only this line (repeatable).")]
JobOption = Annotated[list[str] | None, typer.Option("--job", help="Only this job id (repeatable).")]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]


def _checked_reasons(reasons: list[str] | None) -> set[str]:
    known = {reason.value for reason in DeadReason}
    for reason in reasons or ():
        if reason not in known:
            fail(f"--reason {reason!r} is not a dead-letter reason; one of: {', '.join(sorted(known))}")
    return set(reasons or ())


def _chosen(
    reasons: list[str] | None, lines: list[str] | None, jobs: list[str] | None
) -> tuple[list[tuple[str, DeadLetter]], list[str], StreamNames, redis.Redis]:
    """The dead letters that match the filters, oldest first; the entries that could not be read; the names and
    the Redis client."""
    wanted_reasons = _checked_reasons(reasons)
    wanted_lines = {checked_line(line) for line in lines or ()}
    settings = resolved_settings(redis=True)
    from cluster.connections import redis_client
    from workers.dead_letters import dead_letters, matches

    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    unreadable: list[str] = []
    chosen = [
        (dead_id, letter)
        for dead_id, letter in dead_letters(client, names, unreadable=unreadable)
        if matches(letter, wanted_reasons, wanted_lines, set(jobs or ()))
    ]
    return chosen, unreadable, names, client


def _warn_unreadable(unreadable: list[str]) -> None:
    if unreadable:
        shown = "; ".join(unreadable[:3]) + (" …" if len(unreadable) > 3 else "")
        err.print(
            f"[yellow]skipped {len(unreadable)} entries that are not dead letters of this version: {shown}[/yellow]"
        )


@dead_app.command("list")
def list_cmd(
    reason: ReasonOption = None,
    line: LineOption = None,
    job: JobOption = None,
    count: Annotated[int, typer.Option(min=0, help="Show the latest N that match; 0: all.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List dead letters (oldest of the latest ``--count`` first): reason, job, original entry, deliveries, detail."""
    chosen, unreadable, _, _ = _chosen(reason, line, job)
    shown = chosen[-count:] if count else chosen
    for dead_id, letter in shown:
        if as_json:
            print(json.dumps({"dead_id": dead_id, **letter.model_dump(mode="json")}), flush=True)
        else:
            console.print(
                f"{dead_id}  [bold]{letter.reason.value}[/bold]  job {letter.job_id or '-'}  line "
                f"{letter.line or '-'}  {letter.stream} {letter.entry_id}  deliveries {letter.delivery_count}  "
                f"{letter.dead_at:%Y-%m-%d %H:%M:%S}Z\n    {letter.detail}",
                highlight=False,
                soft_wrap=True,
            )
    if not as_json:
        by_reason: dict[str, int] = {}
        for _, letter in chosen:
            by_reason[letter.reason.value] = by_reason.get(letter.reason.value, 0) + 1
        counts = ", ".join(f"{name} {n}" for name, n in sorted(by_reason.items())) or "none"
        console.print(f"{len(shown)} shown of {len(chosen)} matching ({counts})", highlight=False)
    _warn_unreadable(unreadable)


@dead_app.command("redrive")
def redrive_cmd(
    reason: ReasonOption = None,
    line: LineOption = None,
    job: JobOption = None,
    every: Annotated[bool, typer.Option("--all", help="Every dead letter (no filter needed).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent again; write nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send the matching dead letters' original entries again (once their cause is fixed) and remove the letters.

    Exits 1 when some could not be re-driven: the original entry was trimmed (publish the image again), the
    stream is at its cap (re-drive later), or Redis refused one. A ``duplicate_job`` is never re-driven."""
    if not (reason or line or job or every):
        fail("say which dead letters to re-drive: --reason, --line, --job, or --all")
    chosen, unreadable, names, client = _chosen(reason, line, job)
    from workers.dead_letters import NOT_REDRIVEN, Redrive, redrivable_stream, redrive

    tally = dict.fromkeys(Redrive, 0)
    errors = 0
    for dead_id, letter in chosen:
        if dry_run:
            refused = letter.reason in NOT_REDRIVEN or not redrivable_stream(names, letter.stream)
            present = not refused and client.xrange(letter.stream, min=letter.entry_id, max=letter.entry_id)
            outcome, new_id = (Redrive.REFUSED if refused else Redrive.REDRIVEN if present else Redrive.TRIMMED), None
        else:
            try:
                outcome, new_id = redrive(client, names, dead_id, letter)
            except redis.ResponseError as exc:  # an entry the script cannot copy (thousands of fields, say)
                errors += 1
                err.print(f"{letter.job_id or '-'} ({dead_id}): not re-driven: {exc}", highlight=False)
                continue
        tally[outcome] += 1
        if as_json:
            row = {"dead_id": dead_id, "job_id": letter.job_id, "reason": letter.reason.value, "outcome": outcome.value}
            print(json.dumps({**row, "stream": letter.stream, "entry_id": letter.entry_id, "new_entry_id": new_id}))
        else:
            action = {
                Redrive.REDRIVEN: f"-> {new_id}" if new_id else "would be sent again",
                Redrive.TRIMMED: "its entry was trimmed from the stream: publish the image again",
                Redrive.GONE: "the dead letter is gone (re-driven meanwhile, or trimmed from the dead-letter stream)",
                Redrive.FULL: "not re-driven: the stream holds its cap of unanswered jobs; re-drive later",
                Redrive.REFUSED: "not re-driven: "
                + (
                    "its job id has a result, or another entry was scoring it"
                    if letter.reason in NOT_REDRIVEN
                    else "not a job stream of this prefix"
                ),
            }[outcome]
            console.print(
                f"{letter.job_id or '-'} ({letter.reason.value}): {letter.stream} {letter.entry_id} {action}",
                highlight=False,
            )
    verb = "would re-drive" if dry_run else "re-drove"
    err.print(
        f"{verb} {tally[Redrive.REDRIVEN]} of {len(chosen)}; trimmed {tally[Redrive.TRIMMED]}, "
        f"stream full {tally[Redrive.FULL]}, refused {tally[Redrive.REFUSED]}, already gone {tally[Redrive.GONE]}, "
        f"errors {errors}",
        highlight=False,
    )
    _warn_unreadable(unreadable)
    if tally[Redrive.TRIMMED] or tally[Redrive.FULL] or errors:
        raise typer.Exit(1)
