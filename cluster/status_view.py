"""`render_status`: the ``anomap status`` dict (`cluster.status.gather_status`) as rich tables.

    console.print(render_status(gather_status(settings)))

Streams (length, group, lag, pending, consumers), consumers and their idle time, results of the
last minute per line (rate, latency percentiles, model versions), dead letters by reason, Serve
applications and replicas, and the live model version.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

IDLE_WARN_MS = 60_000
"""A consumer idle longer than this (it asked for nothing) is shown in yellow: dead, or stuck."""


def _n(value: float | None, digits: int = 0, missing: str = "?") -> str:
    if value is None:
        return missing
    return f"{value:,.{digits}f}" if digits else f"{value:,.0f}"


def _seconds(ms: int | None) -> str:
    return "-" if ms is None else f"{ms / 1000:,.1f} s"


def _header(status: dict[str, Any]) -> Text:
    redis = status["redis"]
    text = Text(f"anomap status {status['time']}  ", style="bold")
    text.append(f"redis {redis['url'] or '-'} ")
    text.append("ok" if redis["ok"] else f"unreachable: {redis.get('error', '')}", "green" if redis["ok"] else "red")
    model = status["model"]
    live = ", ".join(f"{line}: {version or 'none'}" for line, version in model["live"].items()) or "unknown"
    text.append(f"\nmodel {model['name']} live {live}")
    if "versions" in model:
        text.append(f" ({model['versions']} versions)")
    if "error" in model:
        text.append(f"  {model['error']}", "red")
    jobs = status["jobs"]
    text.append(
        f"\njobs: {jobs['length']:,} in {jobs['streams']} streams, lag {_n(jobs['lag'])}, "
        f"pending {jobs['pending']:,}, {jobs['consumers']} consumers"
    )
    return text


def _streams_table(streams: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="streams", title_justify="left")
    for column in ("stream", "length", "group", "lag", "pending", "consumers", "max idle"):
        table.add_column(column, justify="left" if column in ("stream", "group") else "right")
    for name, stream in streams.items():
        label = name if stream["exists"] else f"[dim]{name} (none)[/dim]"
        if not stream["groups"]:
            table.add_row(label, f"{stream['length']:,}", "-", "-", "-", "-", "-")
        for group in stream["groups"]:
            idle = max((c["idle_ms"] for c in group["consumers"]), default=None)
            idle_text = _seconds(idle)
            if idle is not None and idle > IDLE_WARN_MS:
                idle_text = f"[yellow]{idle_text}[/yellow]"
            table.add_row(
                label,
                f"{stream['length']:,}",
                group["name"],
                _n(group["lag"]),
                f"{group['pending']:,}",
                str(len(group["consumers"])),
                idle_text,
            )
    return table


def _consumers_table(streams: dict[str, dict[str, Any]]) -> Table | None:
    rows = [
        (name, group["name"], consumer)
        for name, stream in streams.items()
        for group in stream["groups"]
        for consumer in group["consumers"]
    ]
    if not rows:
        return None
    table = Table(title="consumers", title_justify="left")
    for column in ("stream", "group", "consumer", "pending", "idle", "inactive"):
        table.add_column(column, justify="right" if column in ("pending", "idle", "inactive") else "left")
    for stream, group, consumer in rows:
        style = "yellow" if consumer["idle_ms"] > IDLE_WARN_MS else None
        table.add_row(
            stream,
            group,
            consumer["name"],
            f"{consumer['pending']:,}",
            _seconds(consumer["idle_ms"]),
            _seconds(consumer["inactive_ms"]),
            style=style,
        )
    return table


def _results_table(status: dict[str, Any]) -> Table:
    results = status["results"]
    table = Table(title=f"results in the last {results['window_s']:.0f} s", title_justify="left")
    for column in ("line", "results", "per s", "anomalous", "p50 ms", "p95 ms", "p99 ms", "model versions"):
        table.add_column(column, justify="left" if column in ("line", "model versions") else "right")
    for stream in status["streams"].values():
        recent = stream.get("recent")
        if recent is None:
            continue
        latency = recent["latency_ms"]
        table.add_row(
            stream["line"],
            f"{'~' if recent['estimated'] else ''}{recent['count']:,}",
            _n(recent["per_s"], 2),
            f"{recent['anomalous']:,}",
            _n(latency["p50"], missing="-"),
            _n(latency["p95"], missing="-"),
            _n(latency["p99"], missing="-"),
            ", ".join(f"{v} ({n})" for v, n in recent["model_versions"].items()) or "-",
        )
    return table


def _dead_table(dead: dict[str, Any]) -> Table:
    total = "?" if dead["total"] is None else f"{dead['total']:,}"
    table = Table(title=f"dead letters: {total}", title_justify="left")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, count in dead["by_reason"].items():
        table.add_row(reason, f"{count:,}", style="red")
    notes = []
    if dead["total"] and dead["sampled"] < dead["total"]:
        notes.append(f"by reason over the newest {dead['sampled']:,}")
    if dead["by_reason"]:
        notes.append("read them: anomap dead list; send again once fixed: anomap dead redrive --reason R")
    table.caption = "; ".join(notes) or None
    return table


def _serve_view(serve: dict[str, Any]) -> RenderableType:
    if not serve["available"]:
        return Text(f"serve: not shown ({serve['reason']})", style="dim")
    table = Table(title="serve", title_justify="left")
    for column in ("application", "status", "deployment", "deployment status", "replicas"):
        table.add_column(column)
    if not serve["applications"]:
        table.add_row("-", "no applications", "", "", "")
    for name, app in serve["applications"].items():
        app_style = "green" if app["status"] == "RUNNING" else "yellow"
        for i, (deployment, info) in enumerate(app["deployments"].items() or [("-", None)]):
            replicas = ", ".join(f"{state} {n}" for state, n in info["replicas"].items()) if info else ""
            table.add_row(
                name if i == 0 else "",
                f"[{app_style}]{app['status']}[/{app_style}]" if i == 0 else "",
                deployment,
                info["status"] if info else "",
                replicas,
            )
    return table


def render_status(status: dict[str, Any]) -> RenderableType:
    """The status as a group of rich tables, in the order an operator reads them."""
    parts: list[RenderableType] = [_header(status)]
    if status["redis"]["ok"]:
        parts.append(_streams_table(status["streams"]))
        consumers = _consumers_table(status["streams"])
        if consumers is not None:
            parts.append(consumers)
        parts += [_results_table(status), _dead_table(status["dead_letters"])]
    parts.append(_serve_view(status["serve"]))
    return Group(*parts)
