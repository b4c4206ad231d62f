"""`InspectionServer` leaves no Serve app behind when its entry fails after the deploy, or when a stop
request during the deploy is repeated (the second aborts it)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from helpers import register_small_model

import cluster.serving as serving
from cluster.serving import InspectionServer
from schemas import ModelCard, Settings
from trainer.store import ObjectStore
from workers.serve_app import APP_NAME

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def small_model(stack_settings: Settings, ray_cluster: str) -> tuple[Settings, ModelCard]:
    settings = stack_settings.model_copy(update={"bucket": f"clean-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    return settings, register_small_model(store, settings.model_name)


def _apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)


def test_a_failure_after_the_deploy_deletes_the_serve_app(
    small_model: tuple[Settings, ModelCard], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, card = small_model

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("consumer config broke")

    monkeypatch.setattr(serving.ConsumerConfig, "for_service", broken)
    with (
        pytest.raises(RuntimeError, match="consumer config broke"),
        InspectionServer(settings, card.version, consumers=1, scorer_replicas=1),
    ):
        pass
    assert APP_NAME not in _apps()


def test_stop_requests_during_the_deploy_drain_once_up_or_abort_it(
    small_model: tuple[Settings, ModelCard], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As from SIGINT/SIGTERM handlers: one request waits for the deploy, then drains; a second aborts."""
    settings, card = small_model
    real_deploy: Callable[..., Any] = serving.deploy
    requests = [1]

    def deploy_then_signal(*args: Any, **kwargs: Any) -> Any:
        handle = real_deploy(*args, **kwargs)
        for _ in range(requests[0]):
            server.request_stop()  # a signal arriving while deploy() runs
        return handle

    monkeypatch.setattr(serving, "deploy", deploy_then_signal)
    server = InspectionServer(settings, card.version, consumers=1, scorer_replicas=1)
    with server:
        server.wait()  # returns at once: the stop was requested
    assert APP_NAME not in _apps()

    requests[0] = 2
    server = InspectionServer(settings, card.version, consumers=1, scorer_replicas=1)
    with pytest.raises(KeyboardInterrupt), server:
        pass
    assert APP_NAME not in _apps()
