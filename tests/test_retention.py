"""Retention: anomap's expiry rules for maps/ and images/ in the bucket's lifecycle configuration, set
and removed without touching anyone else's rules (pure merging, then a real SeaweedFS bucket)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import point_cli_at
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from typer.testing import CliRunner

from cluster.cli import app
from schemas import Settings
from trainer.store import ObjectStore
from workers.retention import ExpiryRule, expiry_rules, with_expiry

runner = CliRunner()
FOREIGN = Rule(ENABLED, rule_filter=Filter(prefix="logs/"), rule_id="ops-logs", expiration=Expiration(days=3))


def _by_id(config: LifecycleConfig | None) -> dict[str | None, ExpiryRule]:
    return {rule.rule_id: rule for rule in expiry_rules(config)}


def test_anomap_rules_are_added_replaced_and_removed_and_other_rules_stay() -> None:
    config = with_expiry(LifecycleConfig([FOREIGN]), {"maps": 30, "images": 14})
    rules = _by_id(config)
    assert rules["ops-logs"] == ExpiryRule("ops-logs", "logs/", 3, enabled=True, managed=False)
    assert rules["anomap-maps"] == ExpiryRule("anomap-maps", "maps/", 30, enabled=True, managed=True)
    assert rules["anomap-images"] == ExpiryRule("anomap-images", "images/", 14, enabled=True, managed=True)
    shorter = _by_id(with_expiry(config, {"maps": 7}))
    assert (shorter["anomap-maps"].days, shorter["anomap-images"].days, len(shorter)) == (7, 14, 3)
    assert set(_by_id(with_expiry(config, {"maps": None, "images": None}))) == {"ops-logs"}
    assert with_expiry(with_expiry(None, {"maps": 5}), {"maps": None}) is None  # nothing left: no configuration
    assert expiry_rules(None) == []


def test_bad_retention_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"at least 1 day"):
        with_expiry(None, {"maps": 0})
    with pytest.raises(ValueError, match=r"cannot set retention for \['rescore'\].*\['images', 'maps'\]"):
        with_expiry(None, {"rescore": 30})


def test_retention_command_sets_and_removes_rules_on_a_real_bucket(
    stack_settings: Settings, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_cli_at(monkeypatch, stack_settings, object_store.bucket, tmp_path, redis=False)
    shown = runner.invoke(app, ["retention"])
    assert shown.exit_code == 0, shown.output
    assert "no lifecycle rules" in shown.output and "maps/ is kept forever" in shown.output
    object_store.set_lifecycle(LifecycleConfig([FOREIGN]))  # someone else's rule, set before anomap's

    set_both = runner.invoke(app, ["retention", "--maps-days", "30", "--images-days", "14"])
    assert set_both.exit_code == 0, set_both.output
    stored = _by_id(object_store.lifecycle())  # read back from the server
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
    assert set(_by_id(object_store.lifecycle())) == {"ops-logs", "anomap-images"}

    refused = runner.invoke(app, ["retention", "--images-days", "-1"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "Invalid value for '--images-days'" in refused.output, refused.output
    assert set(_by_id(object_store.lifecycle())) == {"ops-logs", "anomap-images"}  # nothing changed
