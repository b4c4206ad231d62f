"""Identifiers are matched whole: ``$`` alone would let a trailing newline through into keys and streams."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import typer

from cluster.cli_common import checked_line
from schemas import LINE_PATTERN, parse_s3_ref
from schemas.ids import MODEL_VERSION_PATTERN
from trainer.imaging import encode_png
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from workers.dataset_upload import DatasetError, dataset_folder_objects


def test_the_patterns_alone_would_accept_a_trailing_newline() -> None:
    """Why the call sites use ``fullmatch``: ``re.match`` with ``$`` matches before a final newline."""
    assert re.match(MODEL_VERSION_PATTERN, "v1\n") and re.match(LINE_PATTERN, "line-a\n")
    assert not re.fullmatch(MODEL_VERSION_PATTERN, "v1\n") and not re.fullmatch(LINE_PATTERN, "line-a\n")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("s3://anomap\n/maps/x.png", "invalid bucket name 'anomap\\\\n'"),
        ("s3://anomap/maps\n/x.png", "unsafe object key segment 'maps\\\\n'"),
        ("s3://anomap/maps/x.png\n", "unsafe object key segment 'x.png\\\\n'"),
        ("s3://anomap\n/maps\n/x\n", "invalid bucket name"),
    ],
)
def test_s3_ref_with_a_trailing_newline_is_rejected(ref: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_s3_ref(ref)
    assert parse_s3_ref("s3://anomap/maps/x.png").key == "maps/x.png"


def test_model_version_with_a_trailing_newline_is_not_a_version_name() -> None:
    registry = ModelRegistry(ObjectStore.__new__(ObjectStore), "metal")  # _prefix never touches the store
    with pytest.raises(ValueError, match=r"model version 'v1\\n' is not a version name"):
        registry._prefix("v1\n")
    assert registry._prefix("v1") == "models/metal/v1/"


def test_cli_line_with_a_trailing_newline_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as info:
        checked_line("line-a\n")
    assert info.value.exit_code == 2
    assert "is not a line id" in capsys.readouterr().err
    assert checked_line("line-a") == "line-a"


def _dataset(root: Path, good_stem: str = "img-1", defect: str = "scratch") -> Path:
    png = encode_png(np.full((16, 16), 128, dtype=np.uint8))
    for folder, stem in (
        (root / "train" / "good", good_stem),
        (root / "test" / "good", "ok-1"),
        (root / "test" / defect, "bad-1"),
    ):
        folder.mkdir(parents=True)
        (folder / f"{stem}.png").write_bytes(png)
    return root


def test_dataset_file_and_folder_names_with_a_trailing_newline_are_rejected(tmp_path: Path) -> None:
    objects, _ = dataset_folder_objects(_dataset(tmp_path / "ok"), "line-a")
    assert "datasets/line-a/train/good/img-1.png" in objects
    with pytest.raises(DatasetError, match=r"file name 'img-1\\n' cannot be an object key"):
        dataset_folder_objects(_dataset(tmp_path / "stem", good_stem="img-1\n"), "line-a")
    with pytest.raises(DatasetError, match=r"folder name 'scratch\\n' cannot be an object key"):
        dataset_folder_objects(_dataset(tmp_path / "label", defect="scratch\n"), "line-a")


def test_worker_side_ids_with_a_trailing_newline_are_refused() -> None:
    """Line, version, tag and bucket checks of the retraining data, re-scoring and archive paths."""
    from workers.archive import ArchiveSource, SourceError
    from workers.rescore_manifest import check_version, map_stem
    from workers.retrain_data import line_prefix

    with pytest.raises(ValueError, match="is not a line id"):
        line_prefix("press-1\n")
    with pytest.raises(ValueError, match="invalid model version"):
        check_version("v1\n")
    with pytest.raises(ValueError, match="invalid source tag"):
        map_stem("v1", "tag\n", "a.png")
    with pytest.raises(SourceError, match="invalid bucket name"):
        ArchiveSource.parse("s3://archive\n/x")
    assert (line_prefix("press-1"), check_version("v1")) == ("datasets/press-1/", "v1")
    assert ArchiveSource.parse("s3://archive/x").bucket == "archive"
