"""``anomap retention``: how long the object store keeps each job's map, overlay and kept image.

anomap retention                                   # the bucket's expiry rules
anomap retention --maps-days 30 --images-days 14   # expire maps/ after 30 days, images/ after 14
anomap retention --maps-days 0                     # keep maps forever again (the rule is removed)

Only anomap's own rules (ids ``anomap-maps``, ``anomap-images``) change; other rules of the bucket
are written back element for element, including what anomap does not understand (shown as such).
See `workers.retention`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from minio.error import S3Error
from rich.markup import escape
from rich.table import Table

from cluster.cli_common import console, fail, resolved_settings
from workers.retention import RETAINED, ExpiryRule, expiry_rules, read_lifecycle, with_expiry, write_lifecycle

DaysOption = Annotated[
    int | None,
    typer.Option(min=0, help="Days to keep; 0 removes anomap's rule (kept forever). Unset: unchanged."),
]


def retention(
    maps_days: DaysOption = None,
    images_days: DaysOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rules as JSON.")] = False,
) -> None:
    """Expire each job's map and overlay (maps/) and kept image (images/) after N days; no options: show the rules."""
    from cluster.connections import object_store

    settings = resolved_settings(s3=True)
    store = object_store(settings)
    changes = {
        name: (days or None) for name, days in (("maps", maps_days), ("images", images_days)) if days is not None
    }
    try:
        if changes:
            write_lifecycle(store, with_expiry(read_lifecycle(store), changes))
        rules = expiry_rules(read_lifecycle(store))
    except ValueError as exc:  # a bad day count, or a configuration that is not lifecycle XML
        fail(escape(str(exc)))
    except S3Error as exc:  # e.g. a store without lifecycle support, or keys without the permission
        fail(f"the object store refused the bucket's lifecycle configuration: {exc.code}: {exc.message}")
    if json_out:
        console.print_json(json.dumps({"bucket": settings.bucket, "rules": [_rule_dict(rule) for rule in rules]}))
        return
    _print_rules(settings.bucket, rules)


def _rule_dict(rule: ExpiryRule) -> dict[str, object]:
    return {
        "id": rule.rule_id,
        "prefix": rule.prefix,
        "applies_to": rule.scope,
        "days": rule.days,
        "enabled": rule.enabled,
        "managed_by_anomap": rule.managed,
    }


def _print_rules(bucket: str, rules: list[ExpiryRule]) -> None:
    kept = set(RETAINED.values()) - {rule.prefix for rule in rules if rule.managed and rule.days}
    table = Table(title=f"lifecycle rules of bucket {bucket}")
    for column in ("id", "applies to", "expires after", "enabled", "set by"):
        table.add_column(column)
    for rule in rules:
        days = f"{rule.days} days" if rule.days is not None else "(not by days)"
        owner = "anomap" if rule.managed else "someone else"
        table.add_row(escape(rule.rule_id or "-"), escape(rule.scope), days, str(rule.enabled), owner)
    if rules:
        console.print(table)
    else:
        console.print(f"bucket {bucket} has no lifecycle rules")
    for prefix in sorted(kept):
        console.print(f"{prefix} is kept forever (nothing in anomap deletes it)")
