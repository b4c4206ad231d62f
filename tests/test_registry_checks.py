"""The registry saves and promotes only versions that serve, and reads a card only under its own name and version.

Against a real S3 store (SeaweedFS): a version written before `ModelRegistry.save` checked is put there
key by key, as an older anomap left it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import SMALL_CONFIG

from schemas import ModelCard
from trainer.model_io import weights_from_bytes, weights_to_bytes
from trainer.pipeline import untrained_model
from trainer.registry import ModelNotFound, ModelRegistry, check_patches, servable_problem
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.synthetic import synth_image

NAME = "metal"


@pytest.fixture(scope="module")
def small() -> tuple[ModelCard, bytes]:
    """A patch-32 version's card and safetensors bytes (untrained networks, calibrated on two images)."""
    images = [synth_image(seed, 64)[0].astype(np.float32) / 255 for seed in range(2)]
    card, state = untrained_model(SMALL_CONFIG, images, NAME, data_digest="test")
    return card, weights_to_bytes(state)


def _nan_weights(weights: bytes) -> bytes:
    state = weights_from_bytes(weights)
    state["generator.project.0.weight"] = torch.full_like(state["generator.project.0.weight"], float("nan"))
    return weights_to_bytes(state)


def _bad_versions(card: ModelCard, weights: bytes) -> dict[str, tuple[ModelCard, bytes, str]]:
    """id -> (card, weights, what the error says) of versions that cannot serve."""
    other_dims = card.model_copy(update={"latent_dim": card.latent_dim * 2})
    no_encoder = weights_to_bytes(
        {k: v for k, v in weights_from_bytes(weights).items() if not k.startswith("encoder.")}
    )
    return {
        "garbage": (card, b"\x80\x04not safetensors", "not valid safetensors"),
        "empty": (card, b"", "empty"),
        "dims": (other_dims, weights, "do not match model card"),
        "nan": (card, _nan_weights(weights), "NaN or infinite values in generator.project.0.weight"),
        "no-encoder": (card, no_encoder, "no 'encoder' entries"),
    }


def _write_unchecked(store: ObjectStore, card: ModelCard, weights: bytes, version: str | None = None) -> None:
    """A version as a registry that did not check wrote it (``version``: the folder, if not the card's)."""
    prefix = f"models/{NAME}/{version or card.version}/"
    store.put_bytes(prefix + "weights.safetensors", weights)
    store.put_bytes(prefix + "card.json", card.model_dump_json().encode(), "application/json")


@pytest.mark.parametrize("case", ["garbage", "empty", "dims", "nan", "no-encoder"])
def test_save_refuses_weights_that_cannot_serve_and_stores_nothing(
    object_store: ObjectStore, small: tuple[ModelCard, bytes], case: str
) -> None:
    card, weights, says = _bad_versions(*small)[case]
    registry = ModelRegistry(object_store, NAME)
    with pytest.raises(ValueError, match=f"model {NAME}/{card.version} cannot be served") as caught:
        registry.save(card, weights)
    assert says in str(caught.value)
    assert registry.versions() == []
    assert list(object_store.list_keys(f"models/{NAME}/")) == []


def test_a_servable_version_is_saved_and_loads(object_store: ObjectStore, small: tuple[ModelCard, bytes]) -> None:
    card, weights = small
    registry = ModelRegistry(object_store, NAME)
    assert servable_problem(card, weights) is None
    registry.save(card, weights)
    loaded_card, loaded = registry.load(card.version)
    maps = PatchModel.from_safetensors(loaded_card, loaded, device="cpu").score_patches(check_patches(32))
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()


def test_a_search_mode_card_is_checked_with_one_step_not_its_search(small: tuple[ModelCard, bytes]) -> None:
    card, weights = small
    search = card.model_copy(
        update={"score_mode": "search", "train_config": {**card.train_config, "search_steps": 100_000}}
    )
    started = time.perf_counter()
    assert servable_problem(search, weights) is None
    assert time.perf_counter() - started < 30  # 100 000 Adam steps would take minutes
    assert "NaN" in (servable_problem(search, _nan_weights(weights)) or "")


def test_nan_weights_that_only_the_scoring_would_show_are_refused(small: tuple[ModelCard, bytes]) -> None:
    """Weights finite one by one, whose maps are not: the check scores a batch as well."""
    card, weights = small
    state = weights_from_bytes(weights)
    key = "generator.project.2.running_var"
    state[key] = torch.full_like(state[key], -1.0)  # finite, but batch norm takes its square root
    problem = servable_problem(card, weights_to_bytes(state))
    assert problem is not None and "NaN or infinite maps" in problem


def test_promote_refuses_a_version_saved_before_the_check_and_moves_nothing(
    object_store: ObjectStore, small: tuple[ModelCard, bytes]
) -> None:
    card, weights = small
    registry = ModelRegistry(object_store, NAME)
    registry.save(card, weights)
    registry.promote(card.version)
    broken = card.model_copy(update={"version": "v-broken"})
    _write_unchecked(object_store, broken, _nan_weights(weights))
    for line in (None, "press-2"):
        with pytest.raises(ValueError, match=f"{NAME}/v-broken cannot be served: weights hold NaN"):
            registry.promote("v-broken", line=line)
    assert registry.live_pointers() == {"default": card.version}
    assert [event.version for event in registry.history()] == [card.version]
    assert registry.history("press-2") == []
    with pytest.raises(ModelNotFound, match="no version 'v-missing'"):
        registry.promote("v-missing")


def test_a_card_copied_under_another_version_or_model_is_refused(
    object_store: ObjectStore, small: tuple[ModelCard, bytes]
) -> None:
    card, weights = small
    registry = ModelRegistry(object_store, NAME)
    registry.save(card, weights)
    _write_unchecked(object_store, card, weights, version="v-copy")  # vA's folder copied as v-copy
    says = f"holds the card of {NAME}/{card.version}, not of {NAME}/v-copy"
    with pytest.raises(ValueError, match=says):
        registry.load_card("v-copy")
    with pytest.raises(ValueError, match=says):
        registry.load("v-copy")
    with pytest.raises(ValueError, match=says):
        registry.promote("v-copy")
    other = ModelRegistry(object_store, "plastic")
    object_store.put_bytes(f"models/plastic/{card.version}/card.json", card.model_dump_json().encode())
    with pytest.raises(ValueError, match=f"holds the card of {NAME}/{card.version}, not of plastic/{card.version}"):
        other.load_card(card.version)
    assert registry.load_card(card.version) == card  # the real one still loads
