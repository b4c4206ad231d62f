"""Training progress lines: step, share, rate and ETA once a rate is known."""

from __future__ import annotations

from trainer.progress import format_eta, progress_line


def test_first_report_has_no_rate_or_eta() -> None:
    line = progress_line(200, 1400, 0.0, 200, {"d_loss": 1.2})
    assert line.startswith("training step 200/1400 (14 %)")
    assert "ETA" not in line
    assert "d_loss 1.2" in line


def test_later_reports_show_rate_and_eta() -> None:
    line = progress_line(600, 1400, 40.0, 200, {})
    assert "10.00 steps/s" in line
    assert "ETA 1 min 20 s" in line


def test_format_eta() -> None:
    assert format_eta(5.4) == "5 s"
    assert format_eta(95) == "1 min 35 s"
    assert format_eta(-3) == "0 s"
