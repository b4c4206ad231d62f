"""What the HTTP gateway raises when the ingress did not score an image (pure logic, no Serve)."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from trainer.registry import ModelNotFound
from workers.http_api import _raise_scoring_error


def _raised(exc: Exception) -> Exception:
    """What the gateway's ``except`` block raises for ``exc`` thrown by the ingress call."""
    try:
        try:
            raise exc
        except Exception as caught:
            _raise_scoring_error(caught, "press-2")
    except Exception as raised:  # whatever it is, the test looks at it
        return raised
    pytest.fail("nothing was raised")


def test_an_unexpected_error_is_raised_as_it_is_not_as_its_own_cause() -> None:
    error = RuntimeError("model version 'v2' failed on this scorer")
    raised = _raised(error)
    assert raised is error
    assert raised.__cause__ is not raised and raised.__context__ is not raised


def test_a_missing_model_is_a_404_chained_to_the_error() -> None:
    error = ModelNotFound("model 'metal' has no live version yet")
    raised = _raised(error)
    assert isinstance(raised, HTTPException) and raised.status_code == 404
    assert raised.detail["reason"] == "no_live_model" and "press-2" in raised.detail["detail"]
    assert raised.__cause__ is error
