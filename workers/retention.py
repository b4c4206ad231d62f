"""How long the object store keeps what anomap writes for every job: S3 lifecycle expiry rules.

Every scored job writes its map and overlay under ``maps/`` (`workers.maps`) and keeps its image
under ``images/`` (`workers.scored_images`); at a fleet's rate that is hundreds of terabytes a day
(docs/capacity.md), and nothing in anomap deletes it. `anomap retention` gives each of those
prefixes an expiration rule in the bucket's lifecycle configuration, under anomap's own rule ids,
and leaves every other rule of the bucket as it was::

    rules = expiry_rules(store.lifecycle())                        # what the bucket has now
    store.set_lifecycle(with_expiry(store.lifecycle(), {"maps": 30, "images": 14}))
    store.set_lifecycle(with_expiry(store.lifecycle(), {"maps": None}))   # keep maps forever again

The store does the expiring: AWS S3 and MinIO run their lifecycle rules themselves. SeaweedFS
stores the rules and, depending on version and setup, stamps a TTL on new writes or leaves them to
its lifecycle worker: on the embedded ``weed mini`` (4.48) the rules are stored and read back, but
an object written under ``maps/`` afterwards carried no TTL of its own, so whether it expires
there was not verified (it takes days). Kept images that expire before an operator confirms a job
can no longer be filed for retraining; choose ``images`` days accordingly. ``images/`` also holds
the camera uploads of by-reference jobs: keep them longer than the longest backlog.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

RETAINED = {"maps": "maps/", "images": "images/"}
"""What anomap can expire: a name for the command line → the key prefix it covers."""
RULE_ID_PREFIX = "anomap-"
"""anomap's rules are ``anomap-maps`` and ``anomap-images``; other ids belong to someone else."""


@dataclass(frozen=True)
class ExpiryRule:
    """One lifecycle rule of the bucket, as `anomap retention` shows it."""

    rule_id: str | None
    prefix: str | None
    """The key prefix it covers; None when its filter is not a plain prefix (tags, and-filters)."""
    days: int | None
    """Days after which objects expire; None when the rule expires on a date or does something else."""
    enabled: bool
    managed: bool
    """Whether anomap set it (its id is ``anomap-<name>``)."""


def rule_id(name: str) -> str:
    """anomap's rule id for the retained prefix ``name`` (a key of `RETAINED`)."""
    return f"{RULE_ID_PREFIX}{name}"


def expiry_rules(config: LifecycleConfig | None) -> list[ExpiryRule]:
    """The bucket's rules (``None``: it has no lifecycle configuration) in their stored order."""
    if config is None:
        return []
    rules = []
    for rule in config.rules:
        prefix = rule.rule_filter.prefix if rule.rule_filter is not None else None
        days = rule.expiration.days if rule.expiration is not None else None
        rules.append(
            ExpiryRule(
                rule_id=rule.rule_id,
                prefix=prefix,
                days=days,
                enabled=rule.status == ENABLED,
                managed=(rule.rule_id or "").startswith(RULE_ID_PREFIX),
            )
        )
    return rules


def with_expiry(config: LifecycleConfig | None, days: Mapping[str, int | None]) -> LifecycleConfig | None:
    """``config`` with anomap's rule for each name in ``days`` set to expire after that many days
    (``None``: the rule removed, those objects kept forever). Rules of other ids, and anomap's rules
    for names not in ``days``, stay as they were. Returns None when no rule is left.

    Raises ValueError for a name that is not in `RETAINED` or a day count below 1.
    """
    unknown = sorted(set(days) - set(RETAINED))
    if unknown:
        msg = f"cannot set retention for {unknown}: anomap expires {sorted(RETAINED)}"
        raise ValueError(msg)
    for name, count in days.items():
        if count is not None and count < 1:
            msg = f"retention for {name} must be at least 1 day (or none to keep forever), got {count}"
            raise ValueError(msg)
    replaced = {rule_id(name) for name in days}
    rules = [rule for rule in (config.rules if config is not None else []) if rule.rule_id not in replaced]
    for name, count in days.items():
        if count is not None:
            rules.append(
                Rule(
                    ENABLED,
                    rule_filter=Filter(prefix=RETAINED[name]),
                    rule_id=rule_id(name),
                    expiration=Expiration(days=count),
                )
            )
    return LifecycleConfig(rules) if rules else None
