"""The ``anomap`` command line.

anomap demo                      # the whole system once, on the embedded stack
anomap stack up|down|status      # the embedded Valkey + SeaweedFS + Ray head
anomap train --synthetic         # train a model version on Ray Train and make it live
anomap train --data DIR          # ... on a dataset folder (MVTec-like layout, method.md §7)
anomap eval --data DIR           # metrics + HTML report of a version on the folder's test images
anomap serve                     # Serve app + stream consumers for the live version
anomap publish PATH...           # images (files or folders) as jobs
anomap results [--follow]        # print results
anomap status [--watch] [--json] # streams, lag, pending, consumers, dead letters, throughput, Serve, model
anomap loadgen --cameras 8 --fps 1 --duration 30   # a simulated camera fleet, open loop
anomap dead list|redrive         # dead letters: read them, send them again once their cause is fixed
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from cluster.cli_common import checked_line, console, env_settings, err, fail, first_line, resolved_settings
from cluster.cli_eval import check_output_paths, eval_cmd
from cluster.cli_failures import unreachable_message
from cluster.cli_serve import serve
from cluster.cli_train import train
from schemas import InspectionJob, StreamNames

app = typer.Typer(
    help="anomap: pixel-level anomaly maps for factory camera images, at fleet scale.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(
    help="The embedded stack: Valkey, SeaweedFS (S3) and a Ray head on 127.0.0.1.", no_args_is_help=True
)
app.add_typer(stack_app, name="stack")
app.command()(train)  # training: cluster.cli_train; evaluation: cluster.cli_eval
app.command("eval")(eval_cmd)
app.command()(serve)  # the Serve app and consumers: cluster.cli_serve

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@stack_app.command("up")
def stack_up_cmd(
    dashboard: Annotated[
        bool,
        typer.Option(
            help="Start the Ray head with its dashboard (web UI and State API; ~1.2 GB). Without it, a killed "
            "training driver leaves Ray Train's PlacementGroupCleaner (~200 MB) running until the head stops."
        ),
    ] = True,
) -> None:
    """Start what is not configured (Valkey, `weed mini`, Ray head) and record it in the state file.

    Progress goes to stderr, the state (as JSON) to stdout: `anomap stack up | jq` works.
    """
    from cluster.stack import StackError, stack_up
    from cluster.start_lock import StartLockTimeout

    try:
        state = stack_up(env_settings(), progress=err.log, dashboard=dashboard)
    except (StackError, StartLockTimeout, ValueError) as exc:  # ValueError: an unreadable state file
        fail(first_line(exc))
    console.print_json(state.public_json())


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop exactly the processes `anomap stack up` started."""
    from cluster.stack import StackError, stack_down
    from cluster.start_lock import StartLockTimeout

    try:
        stopped = stack_down(env_settings())
    except (StackError, StartLockTimeout, ValueError) as exc:  # ValueError: an unreadable state file
        fail(str(exc))
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing'}")


@stack_app.command("status")
def stack_status_cmd() -> None:
    """Show each component's endpoint, PID and whether it answers."""
    from cluster.stack import stack_status

    try:
        status = stack_status(env_settings())
    except ValueError as exc:  # an unreadable state file
        fail(str(exc))
    console.print_json(json.dumps(status, default=str))


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{path} is neither a file nor a folder")
    return files


@app.command()
def publish(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    camera: Annotated[str, typer.Option(help="Camera id for these jobs.")] = "cam01",
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    by_reference: Annotated[bool, typer.Option(help="Upload to the object store and send s3:// refs.")] = False,
) -> None:
    """Publish images as inspection jobs; prints each job id."""
    settings = resolved_settings(redis=True, s3=by_reference)
    from pydantic import ValidationError

    from cluster.connections import object_store, redis_client
    from workers.publisher import LineBacklogFull, publish_by_reference, publish_job

    files = _image_files(paths)
    if not files:
        fail("no image files found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    client = redis_client(settings)
    names = StreamNames(settings.stream_prefix)
    store = object_store(settings) if by_reference else None
    run = uuid.uuid4().hex[:8]
    for i, file in enumerate(files):
        try:
            job = InspectionJob(job_id=f"{camera}-{run}-{i:05d}", camera_id=camera, line=line)
        except ValidationError as exc:
            fail(f"invalid --camera or --line: {exc.errors()[0]['msg']}")
        data = file.read_bytes()
        try:
            if store is not None:
                entry, _ = publish_by_reference(client, names, store, job, data, file.suffix.lower())
            else:
                entry = publish_job(client, names, job, image=data)
        except LineBacklogFull as exc:
            fail(f"{file}: {exc}")
        print(f"{job.job_id}\t{file}\t{entry}", flush=True)


@app.command()
def results(
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    follow: Annotated[bool, typer.Option(help="Then wait for new results (Ctrl-C stops).")] = False,
    count: Annotated[int, typer.Option(min=0, max=100_000, help="How many of the latest results.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON result per line.")] = False,
) -> None:
    """Print results (the latest ``count``, then with --follow each new one as it arrives)."""
    settings = resolved_settings(redis=True)
    from cluster.connections import redis_client
    from workers.results import follow_entries, read_answer

    client = redis_client(settings)
    stream = StreamNames(settings.stream_prefix).results(checked_line(line))
    newest = client.xrevrange(stream, count=count) if count else []
    entries: Iterable[tuple[Any, dict[bytes, bytes]]] = reversed(newest)
    if follow:  # from the newest entry seen, so nothing written between the two reads is missed
        last = client.xrevrange(stream, count=1) if not newest else newest[:1]
        entries = itertools.chain(entries, follow_entries(client, stream, last[0][0].decode() if last else "0-0"))
    for entry_id, fields in entries:
        name = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            result = read_answer(False, fields)
        except ValueError as exc:  # another writer's entry, or a newer version's: say so, go on
            err.print(f"skipping results entry {name}: {str(exc).splitlines()[0]}")
            continue
        if as_json:
            print(result.model_dump_json(), flush=True)
        else:
            verdict = "ANOMALOUS" if result.is_anomalous else "ok"
            print(
                f"{result.job_id}\t{verdict}\tscore={result.image_score:.2f}\tregions={len(result.regions)}\t"
                f"{result.model_version}\t{result.map_ref}",
                flush=True,
            )


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object (with --watch: one per line, per refresh).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="Seconds between refreshes (--watch).")] = 2.0,
    serve_status: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Ask Ray for Serve applications and replicas.")
    ] = True,
    scan: Annotated[
        bool,
        typer.Option(
            "--scan",
            help="Find every stream by scanning Redis's keyspace, not from the set of lines in use "
            "(also finds lines only another publisher writes to; slow with millions of job markers).",
        ),
    ] = False,
) -> None:
    """Streams (length, lag, pending, consumers), dead letters, throughput, latency, Serve and the live model.

    Exit status 1 when Redis does not answer (the JSON says why).
    """
    settings = resolved_settings(redis=True)
    from rich.live import Live

    from cluster.status import StatusOptions, gather_status
    from cluster.status_view import render_status

    options = StatusOptions(serve=serve_status, scan=scan)
    if not watch:
        document = gather_status(settings, options)
        if as_json:
            print(json.dumps(document), flush=True)
        else:
            console.print(render_status(document))
        if not document["redis"]["ok"]:
            raise typer.Exit(1)
        return
    try:
        if as_json:
            while True:
                print(json.dumps(gather_status(settings, options)), flush=True)
                time.sleep(interval)
        with Live(render_status(gather_status(settings, options)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(gather_status(settings, options)), refresh=True)
    except KeyboardInterrupt:
        return


@app.command()
def loadgen(
    cameras: Annotated[int, typer.Option(min=1, max=1024, help="Simulated cameras.")] = 4,
    fps: Annotated[float, typer.Option(min=0.01, max=1000, help="Frames per second, per camera.")] = 1.0,
    duration: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds of publishing.")] = 30.0,
    by_reference: Annotated[
        bool, typer.Option("--by-reference/--inline", help="Upload each image and send an s3:// ref.")
    ] = False,
    line: Annotated[str, typer.Option(help="Production line.")] = "default",
    size: Annotated[int, typer.Option(min=32, max=8192, help="Image size in pixels.")] = 256,
    pool: Annotated[int, typer.Option(min=1, max=64, help="Distinct images per camera, sent round-robin.")] = 4,
    defect_share: Annotated[float, typer.Option(min=0, max=1, help="Share of each pool with a defect.")] = 0.5,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to wait for answers after publishing.")] = 60.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary as JSON here.")] = None,
) -> None:
    """Open-loop load: every camera publishes at --fps for --duration s; prints rates and latencies."""
    settings = resolved_settings(redis=True, s3=by_reference)
    from pydantic import ValidationError
    from rich.live import Live

    from cluster.connections import object_store, redis_client
    from workers.loadgen import LoadGenerator, camera_images, progress_line, publish_schedule

    try:
        InspectionJob(job_id="loadgen-check", line=line)
    except ValidationError as exc:
        fail(f"invalid --line: {exc.errors()[0]['msg']}")
    schedule = publish_schedule(cameras, fps, duration)
    if not schedule[0]:
        fail(f"--fps {fps} × --duration {duration} is less than one frame per camera")
    with console.status(f"making {cameras} × {pool} images of {size}² px"):
        pools = camera_images(cameras, size, pool, defect_share)
    store = object_store(settings) if by_reference else None
    names = StreamNames(settings.stream_prefix)
    generator = LoadGenerator(redis_client(settings), names, store, line, pools, uuid.uuid4().hex[:8])
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        summary = generator.run(schedule, fps, duration, grace, lambda p: live.update(progress_line(p)))
    document = summary.as_dict()
    latency, lag = document["latency_ms"], document["publish_lag_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    console.print(
        f"run {document['run_id']}: offered {document['offered']} ({document['offered_rate']:.2f}/s), "
        f"refused {document['refused']}, "
        f"results {document['results']}, dead letters {document['dead_letters']}, "
        f"unanswered {document['unanswered']}, achieved {document['achieved_rate']:.2f}/s over "
        f"{document['span_s']:.1f} s\nlatency ms p50 {ms(latency['p50'])} p95 {ms(latency['p95'])} "
        f"p99 {ms(latency['p99'])}; publish lag ms p50 {ms(lag['p50'])} max {ms(lag['max'])}; "
        f"achieved == offered: {document['achieved_equals_offered']}"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(document, indent=2) + "\n")
    problems = []
    if document["refused"]:
        problems.append(
            f"the line refused {document['refused']} frames: its job stream was full of unanswered jobs "
            "(consumers behind or stopped; `anomap status`)"
        )
    if document["unanswered"]:
        problems.append(f"{document['unanswered']} jobs were not answered within --grace {grace} s")
    if document["dead_letters"]:
        problems.append(f"{document['dead_letters']} jobs became dead letters (see anomap:dead)")
    for problem in problems:
        err.print(f"[red]{problem}[/red]")
    if problems:
        raise typer.Exit(1)


@app.command()
def demo(
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary as JSON here.")] = None,
    report: Annotated[Path, typer.Option(help="Folder for the visual report.")] = Path("demo-report"),
    jobs: Annotated[int, typer.Option(min=4, max=10_000, help="Images the cameras publish.")] = 48,
    cameras: Annotated[int, typer.Option(min=1, max=64)] = 4,
    size: Annotated[int, typer.Option(min=64, max=4096, help="Image size in pixels.")] = 1024,
) -> None:
    """Run the whole system once: stack, data, training, serving, a camera fleet, a report."""
    from cluster.demo import DemoOptions, DemoRefused, run_demo
    from cluster.stack import StackError
    from cluster.start_lock import StartLockTimeout
    from cluster.state import StateFileError

    env_settings()  # a wrong variable is one line, before anything starts
    check_output_paths(json_path, report)  # before minutes of running, not after
    try:
        summary = run_demo(
            DemoOptions(jobs=jobs, cameras=cameras, image_size=size, report_dir=report, json_path=json_path), console
        )
    except (DemoRefused, StackError, StartLockTimeout, StateFileError) as exc:  # StackStartError: names the log
        fail(first_line(exc))
    if summary["results"] != summary["published"] or summary["dead_letters"]:
        err.print("[red]not every job produced a result[/red]")
        raise typer.Exit(1)


from cluster.cli_rescore import rescore  # noqa: E402  (archive re-scoring lives in its own module)

app.command()(rescore)

from cluster.cli_confirm import confirm, confirmations_app  # noqa: E402  (confirmations live in their own module)
from cluster.cli_models import models_app  # noqa: E402

app.command()(confirm)
app.add_typer(confirmations_app, name="confirmations")
app.add_typer(models_app, name="models")

from cluster.cli_retrain import datasets_app, retrain  # noqa: E402  (the retraining controller's own module)

app.command()(retrain)
app.add_typer(datasets_app, name="datasets")

from cluster.cli_retention import retention  # noqa: E402  (object-store expiry rules)

app.command()(retention)

from cluster.cli_dead import dead_app  # noqa: E402  (listing and re-driving dead letters)

app.add_typer(dead_app, name="dead")


def main() -> None:
    """Console-script entry point: a service that cannot be reached, or refuses us, is a one-line error.

    The click command is run directly, not through ``app()``: Typer's ``__call__`` sets an attribute on
    any exception passing through it, which frozen exceptions (minio's `S3Error`) refuse with an
    AttributeError of their own.
    """
    command = typer.main.get_command(app)
    try:
        command(standalone_mode=True)  # exits by itself
    except Exception as exc:
        message = unreachable_message(exc)
        if message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
