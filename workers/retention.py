"""How long the object store keeps what anomap writes for every job: S3 lifecycle expiry rules.

Every scored job writes its map and overlay under ``maps/`` (`workers.maps`) and keeps its image
under ``images/`` (`workers.scored_images`); at a fleet's rate that is hundreds of terabytes a day
(docs/capacity.md), and nothing in anomap deletes it. `anomap retention` gives each of those
prefixes an expiration rule in the bucket's lifecycle configuration, under anomap's own rule ids,
and leaves every other rule of the bucket as it was::

    rules = expiry_rules(read_lifecycle(store))                      # what the bucket has now
    write_lifecycle(store, with_expiry(read_lifecycle(store), {"maps": 30, "images": 14}))
    write_lifecycle(store, with_expiry(read_lifecycle(store), {"maps": None}))   # keep maps forever again

The configuration is read and written as the store's own XML, not through minio-py's
``LifecycleConfig``: that model keeps only what it knows, so a round trip through it changes other
tools' rules (a legacy top-level ``<Prefix>`` rule came back with no filter, i.e. for the whole
bucket; an ``<And>`` filter lost its ``<ObjectSizeGreaterThan>``) and it cannot read an empty
``<Filter/>`` at all. Here anomap's rules are added or removed as elements and every other rule is
written back element for element, whatever it holds; rules anomap does not understand are shown as
such and left alone.

The store does the expiring: AWS S3 and MinIO run their lifecycle rules themselves. SeaweedFS
stores the rules and, depending on version and setup, stamps a TTL on new writes or leaves them to
its lifecycle worker: on the embedded ``weed mini`` (4.48) the rules are stored and read back, but
an object written under ``maps/`` afterwards carried no TTL of its own, so whether it expires
there was not verified (it takes days). Kept images that expire before an operator confirms a job
can no longer be filed for retraining; choose ``images`` days accordingly. ``images/`` also holds
the camera uploads of by-reference jobs: keep them longer than the longest backlog.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from minio.error import S3Error
from minio.helpers import md5sum_hash

from trainer.store import ObjectStore

RETAINED = {"maps": "maps/", "images": "images/"}
"""What anomap can expire: a name for the command line → the key prefix it covers."""
RULE_ID_PREFIX = "anomap-"
"""anomap's rules are ``anomap-maps`` and ``anomap-images``; other ids belong to someone else."""
ROOT_TAG = "LifecycleConfiguration"
_LIFECYCLE_QUERY = {"lifecycle": ""}


class LifecycleError(ValueError):
    """The bucket's lifecycle configuration is not one anomap can read (not XML, or another document)."""


@dataclass(frozen=True)
class ExpiryRule:
    """One lifecycle rule of the bucket, as `anomap retention` shows it."""

    rule_id: str | None
    prefix: str | None
    """The key prefix it covers (``""``: the whole bucket); None when its filter is more than a prefix."""
    days: int | None
    """Days after which objects expire; None when the rule expires on a date or does something else."""
    enabled: bool
    managed: bool
    """Whether anomap set it (its id is ``anomap-<name>``)."""
    scope: str
    """What it applies to, in words: ``prefix logs/``, ``whole bucket``, ``prefix logs/ and size > 1024 bytes``."""


def rule_id(name: str) -> str:
    """anomap's rule id for the retained prefix ``name`` (a key of `RETAINED`)."""
    return f"{RULE_ID_PREFIX}{name}"


def _local(tag: str) -> str:
    """An element's name without its namespace (``{http://s3…}Rule`` → ``Rule``)."""
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    return next((child for child in element if _local(child.tag) == name), None)


def _text(element: ET.Element | None, name: str) -> str | None:
    found = None if element is None else _child(element, name)
    return None if found is None else (found.text or "").strip()


def parse_lifecycle(xml: str) -> ET.Element:
    """The ``LifecycleConfiguration`` root of ``xml``; raises `LifecycleError` when it is not one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        msg = f"the bucket's lifecycle configuration is not valid XML ({exc}); fix or remove it with the store's tools"
        raise LifecycleError(msg) from exc
    if _local(root.tag) != ROOT_TAG:
        msg = f"the bucket's lifecycle configuration is a <{_local(root.tag)}>, not a <{ROOT_TAG}>"
        raise LifecycleError(msg)
    return root


def _condition(element: ET.Element) -> str:
    """One filter condition in words (``prefix logs/``, ``tag k=v``, ``size > 5 bytes``)."""
    name, text = _local(element.tag), (element.text or "").strip()
    if name == "Prefix":
        return f"prefix {text}" if text else "whole bucket"
    if name == "Tag":
        return f"tag {_text(element, 'Key')}={_text(element, 'Value')}"
    if name == "ObjectSizeGreaterThan":
        return f"size > {text} bytes"
    if name == "ObjectSizeLessThan":
        return f"size < {text} bytes"
    return f"<{name}> (not understood)"


def rule_scope(rule: ET.Element) -> tuple[str | None, str]:
    """What a ``<Rule>`` applies to: (its plain prefix, or None when the filter is more than one; in words)."""
    rule_filter = _child(rule, "Filter")
    if rule_filter is None:
        legacy = _text(rule, "Prefix")
        if legacy is None:
            return "", "whole bucket (no filter)"
        return legacy, f"prefix {legacy} (legacy form)" if legacy else "whole bucket (legacy form)"
    conditions = list(rule_filter)
    if len(conditions) == 1 and _local(conditions[0].tag) == "And":
        conditions = list(conditions[0])
    if not conditions:
        return "", "whole bucket"
    described = " and ".join(_condition(condition) for condition in conditions)
    if len(conditions) == 1 and _local(conditions[0].tag) == "Prefix":
        return (conditions[0].text or "").strip(), described
    return None, described


def _expiry_days(rule: ET.Element) -> int | None:
    days = _text(_child(rule, "Expiration"), "Days")
    return int(days) if days is not None and days.isdigit() else None


def expiry_rules(xml: str | None) -> list[ExpiryRule]:
    """The rules of a lifecycle configuration (``None``: the bucket has none) in their stored order.

    Never fails on a rule it does not understand: its scope says so. Raises `LifecycleError` when
    ``xml`` is not a lifecycle configuration at all.
    """
    if xml is None:
        return []
    rules = []
    for rule in parse_lifecycle(xml):
        if _local(rule.tag) != "Rule":
            continue
        prefix, scope = rule_scope(rule)
        identifier = _text(rule, "ID") or None
        rules.append(
            ExpiryRule(
                rule_id=identifier,
                prefix=prefix,
                days=_expiry_days(rule),
                enabled=_text(rule, "Status") == "Enabled",
                managed=(identifier or "").startswith(RULE_ID_PREFIX),
                scope=scope,
            )
        )
    return rules


def _anomap_rule(namespace: str, name: str, days: int) -> ET.Element:
    """anomap's ``<Rule>`` expiring ``RETAINED[name]`` after ``days`` days."""

    def sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
        element = ET.SubElement(parent, f"{namespace}{tag}")
        element.text = text
        return element

    rule = ET.Element(f"{namespace}Rule")
    sub(rule, "ID", rule_id(name))
    sub(sub(rule, "Filter"), "Prefix", RETAINED[name])
    sub(rule, "Status", "Enabled")
    sub(sub(rule, "Expiration"), "Days", str(days))
    return rule


def check_days(days: Mapping[str, int | None]) -> None:
    """Raise ValueError for a name that is not in `RETAINED` or a day count below 1."""
    unknown = sorted(set(days) - set(RETAINED))
    if unknown:
        msg = f"cannot set retention for {unknown}: anomap expires {sorted(RETAINED)}"
        raise ValueError(msg)
    for name, count in days.items():
        if count is not None and count < 1:
            msg = f"retention for {name} must be at least 1 day (or none to keep forever), got {count}"
            raise ValueError(msg)


def with_expiry(xml: str | None, days: Mapping[str, int | None]) -> str | None:
    """``xml`` (a lifecycle configuration; None: none) with anomap's rule for each name in ``days`` set to
    expire after that many days (``None``: the rule removed, those objects kept forever). Every other
    element — rules of other ids, whatever they hold, and anomap's rules for names not in ``days`` —
    is written back as it was. Returns None when no rule is left (the configuration is to be deleted).

    Raises ValueError for a name that is not in `RETAINED` or a day count below 1, `LifecycleError`
    when ``xml`` is not a lifecycle configuration.
    """
    check_days(days)
    root = parse_lifecycle(xml) if xml is not None else ET.Element(ROOT_TAG)
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    replaced = {rule_id(name) for name in days}
    for rule in [child for child in root if _local(child.tag) == "Rule" and _text(child, "ID") in replaced]:
        root.remove(rule)
    for name, count in days.items():
        if count is not None:
            root.append(_anomap_rule(namespace, name, count))
    if not any(_local(child.tag) == "Rule" for child in root):
        return None
    try:  # the store's default namespace stays the default one (no ns0: prefixes)
        return ET.tostring(root, encoding="unicode", default_namespace=namespace.strip("{}") or None)
    except ValueError:  # an element outside that namespace: let ElementTree prefix them
        return ET.tostring(root, encoding="unicode")


def read_lifecycle(store: ObjectStore) -> str | None:
    """The bucket's lifecycle configuration as the store sent it (XML), None when it has none.

    minio-py has no public call for the raw document (``get_bucket_lifecycle`` parses it into its model,
    which loses what it does not know), so this makes the same signed request itself.
    """
    try:
        response = store.client._execute("GET", store.bucket, query_params=_LIFECYCLE_QUERY)
    except S3Error as exc:
        if exc.code == "NoSuchLifecycleConfiguration":
            return None
        raise
    text = response.data.decode()
    return text if text.strip() else None


def write_lifecycle(store: ObjectStore, xml: str | None) -> None:
    """Replace the bucket's lifecycle configuration with ``xml`` as it is; None deletes it."""
    if xml is None:
        store.client.delete_bucket_lifecycle(store.bucket)
        return
    body = xml.encode()
    store.client._execute(  # private: see read_lifecycle
        "PUT", store.bucket, body=body, headers={"Content-MD5": md5sum_hash(body)}, query_params=_LIFECYCLE_QUERY
    )
