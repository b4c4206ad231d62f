"""Retention: anomap's expiry rules for maps/ and images/ in the bucket's lifecycle configuration, set
and removed without touching anyone else's rules (pure merging of the store's XML, then a real
SeaweedFS bucket, which stores the document as sent)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import point_cli_at
from typer.testing import CliRunner

from cluster.cli import app
from schemas import Settings
from trainer.store import ObjectStore
from workers.retention import (
    ExpiryRule,
    LifecycleError,
    expiry_rules,
    read_lifecycle,
    with_expiry,
    write_lifecycle,
)

runner = CliRunner()
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
FOREIGN = (
    "<Rule><ID>ops-logs</ID><Filter><Prefix>logs/</Prefix></Filter><Status>Enabled</Status>"
    "<Expiration><Days>3</Days></Expiration></Rule>"
)
UNMODELLED = (  # what minio-py's LifecycleConfig dropped or could not read
    "<Rule><ID>legacy-tmp</ID><Prefix>tmp/</Prefix><Status>Enabled</Status>"  # legacy top-level prefix
    "<Expiration><Days>2</Days></Expiration></Rule>"
    "<Rule><ID>big-logs</ID><Filter><And><Prefix>logs/</Prefix>"  # and-filter with a size condition
    "<ObjectSizeGreaterThan>1048576</ObjectSizeGreaterThan></And></Filter><Status>Enabled</Status>"
    "<Expiration><Days>5</Days></Expiration></Rule>"
    "<Rule><ID>abort-uploads</ID><Filter/><Status>Enabled</Status>"  # an empty filter: the whole bucket
    "<AbortIncompleteMultipartUpload><DaysAfterInitiation>2</DaysAfterInitiation></AbortIncompleteMultipartUpload>"
    "</Rule>"
)


def _config(rules: str, namespace: bool = True) -> str:
    xmlns = f' xmlns="{S3_NS}"' if namespace else ""
    return f"<LifecycleConfiguration{xmlns}>{rules}</LifecycleConfiguration>"


def _by_id(xml: str | None) -> dict[str | None, ExpiryRule]:
    return {rule.rule_id: rule for rule in expiry_rules(xml)}


def _foreign_rules(xml: str | None) -> list[str]:
    """Every rule whose id is not anomap's, in canonical XML (namespaces and empty-element forms aside)."""
    if xml is None:
        return []
    rules = [child for child in ET.fromstring(xml) if child.tag.endswith("Rule")]
    return [
        ET.canonicalize(ET.tostring(rule, encoding="unicode"))
        for rule in rules
        if not (rule.findtext(f"{{{S3_NS}}}ID") or rule.findtext("ID") or "").startswith("anomap-")
    ]


def test_anomap_rules_are_added_replaced_and_removed_and_other_rules_stay() -> None:
    config = with_expiry(_config(FOREIGN, namespace=False), {"maps": 30, "images": 14})
    rules = _by_id(config)
    assert rules["ops-logs"] == ExpiryRule("ops-logs", "logs/", 3, True, False, "prefix logs/")
    assert rules["anomap-maps"] == ExpiryRule("anomap-maps", "maps/", 30, True, True, "prefix maps/")
    assert rules["anomap-images"] == ExpiryRule("anomap-images", "images/", 14, True, True, "prefix images/")
    shorter = _by_id(with_expiry(config, {"maps": 7}))
    assert (shorter["anomap-maps"].days, shorter["anomap-images"].days, len(shorter)) == (7, 14, 3)
    assert set(_by_id(with_expiry(config, {"maps": None, "images": None}))) == {"ops-logs"}
    assert with_expiry(with_expiry(None, {"maps": 5}), {"maps": None}) is None  # nothing left: no configuration
    assert expiry_rules(None) == []


def test_rules_the_model_did_not_know_are_written_back_element_for_element() -> None:
    """minio-py's LifecycleConfig turned the legacy prefix rule into a whole-bucket one, dropped the size
    condition and raised on the empty filter; merging the XML keeps each of them as it was."""
    original = _config(FOREIGN + UNMODELLED)
    both = with_expiry(original, {"maps": 30, "images": 14})
    assert both is not None and both.startswith(f'<LifecycleConfiguration xmlns="{S3_NS}">')  # no ns0: prefixes
    assert _foreign_rules(both) == _foreign_rules(original)
    assert (_by_id(both)["anomap-maps"].prefix, _by_id(both)["anomap-maps"].days) == ("maps/", 30)
    back = with_expiry(both, {"maps": None, "images": None})
    assert back is not None and ET.canonicalize(back) == ET.canonicalize(original)


def test_the_rules_view_reads_what_the_model_could_not() -> None:
    rules = _by_id(_config(UNMODELLED))
    assert rules["legacy-tmp"] == ExpiryRule("legacy-tmp", "tmp/", 2, True, False, "prefix tmp/ (legacy form)")
    assert rules["big-logs"] == ExpiryRule("big-logs", None, 5, True, False, "prefix logs/ and size > 1048576 bytes")
    assert rules["abort-uploads"] == ExpiryRule("abort-uploads", "", None, True, False, "whole bucket")
    odd = _by_id(_config("<Rule><ID>x</ID><Filter><Shiny>1</Shiny></Filter><Status>Disabled</Status></Rule>"))
    assert odd["x"].scope == "<Shiny> (not understood)" and not odd["x"].enabled


def test_bad_retention_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"at least 1 day"):
        with_expiry(None, {"maps": 0})
    with pytest.raises(ValueError, match=r"cannot set retention for \['rescore'\].*\['images', 'maps'\]"):
        with_expiry(None, {"rescore": 30})
    with pytest.raises(LifecycleError, match=r"not valid XML"):
        expiry_rules("<LifecycleConfiguration><Rule>")
    with pytest.raises(LifecycleError, match=r"is a <CORSConfiguration>"):
        with_expiry("<CORSConfiguration/>", {"maps": 3})


def test_retention_command_sets_and_removes_rules_on_a_real_bucket(
    stack_settings: Settings, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_cli_at(monkeypatch, stack_settings, object_store.bucket, tmp_path, redis=False)
    shown = runner.invoke(app, ["retention"])
    assert shown.exit_code == 0, shown.output
    assert "no lifecycle rules" in shown.output and "maps/ is kept forever" in shown.output
    write_lifecycle(object_store, _config(FOREIGN))  # someone else's rule, set before anomap's

    set_both = runner.invoke(app, ["retention", "--maps-days", "30", "--images-days", "14"])
    assert set_both.exit_code == 0, set_both.output
    stored = _by_id(read_lifecycle(object_store))  # read back from the server
    assert {rule_id: (rule.prefix, rule.days) for rule_id, rule in stored.items()} == {
        "ops-logs": ("logs/", 3),
        "anomap-maps": ("maps/", 30),
        "anomap-images": ("images/", 14),
    }

    removed = runner.invoke(app, ["retention", "--maps-days", "0", "--json"])
    assert removed.exit_code == 0, removed.output
    listed = json.loads(removed.output)
    assert listed["bucket"] == object_store.bucket
    assert {(rule["id"], rule["days"], rule["managed_by_anomap"]) for rule in listed["rules"]} == {
        ("ops-logs", 3, False),
        ("anomap-images", 14, True),
    }
    assert set(_by_id(read_lifecycle(object_store))) == {"ops-logs", "anomap-images"}

    refused = runner.invoke(app, ["retention", "--images-days", "-1"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "Invalid value for '--images-days'" in refused.output, refused.output
    assert set(_by_id(read_lifecycle(object_store))) == {"ops-logs", "anomap-images"}  # nothing changed


def test_retention_command_leaves_rules_it_does_not_model_as_they_were(
    stack_settings: Settings, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Against the real store: showing such rules works, and setting and removing anomap's rules gives
    every other rule back to the server unchanged (the legacy rule does not become a whole-bucket one)."""
    point_cli_at(monkeypatch, stack_settings, object_store.bucket, tmp_path, redis=False)
    write_lifecycle(object_store, _config(UNMODELLED))
    before = read_lifecycle(object_store)

    shown = runner.invoke(app, ["retention", "--json"])
    assert shown.exit_code == 0, shown.output
    scopes = {rule["id"]: rule["applies_to"] for rule in json.loads(shown.output)["rules"]}
    assert scopes == {
        "legacy-tmp": "prefix tmp/ (legacy form)",
        "big-logs": "prefix logs/ and size > 1048576 bytes",
        "abort-uploads": "whole bucket",
    }
    table = runner.invoke(app, ["retention"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "legacy form" in table.output, table.output

    set_maps = runner.invoke(app, ["retention", "--maps-days", "30"])
    assert set_maps.exit_code == 0, set_maps.output
    after = read_lifecycle(object_store)
    assert _foreign_rules(after) == _foreign_rules(before)
    assert _by_id(after)["anomap-maps"].days == 30

    removed = runner.invoke(app, ["retention", "--maps-days", "0"])
    assert removed.exit_code == 0, removed.output
    assert _foreign_rules(read_lifecycle(object_store)) == _foreign_rules(before)
    assert "anomap-maps" not in _by_id(read_lifecycle(object_store))
