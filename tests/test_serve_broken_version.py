"""A version that cannot load fails only its own images, through real Ray Serve, S3 and the registry.

The default line's live version has garbage weights, written key by key as a registry that did not yet
check (`ModelRegistry.save`) would have left them; line ``press-2`` has a good version of its own. Before
the fix the scorer replicas died preloading the default version (every line down), and one broken range
in a ``@serve.batch`` failed every range batched with it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import SIZE, register_small_model
from ray import serve
from ray.serve.handle import DeploymentHandle

from schemas import ModelCard, Settings
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import synth_image
from workers.inspection import ScoredImage
from workers.patch_scorer import LOAD_FAILURE_TTL_S
from workers.serve_app import APP_NAME, deploy

pytestmark = pytest.mark.ray

BROKEN = "v-broken"


@pytest.fixture(scope="module")
def broken_default(stack_settings: Settings, ray_cluster: str) -> Iterator[tuple[DeploymentHandle, ModelCard]]:
    settings = stack_settings.model_copy(update={"bucket": f"broken-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    registry = ModelRegistry(store, settings.model_name)
    good = register_small_model(store, settings.model_name)
    registry.promote(good.version, line="press-2")
    broken = good.model_copy(update={"version": BROKEN})
    prefix = f"models/{settings.model_name}/{BROKEN}/"
    store.put_bytes(prefix + "weights.safetensors", b"not safetensors at all")
    store.put_bytes(prefix + "card.json", broken.model_dump_json().encode(), "application/json")
    store.put_bytes(f"models/{settings.model_name}/live", BROKEN.encode(), "text/plain")  # the default line
    handle = deploy(settings, None, scorer_replicas=1, chunk_patches=32)  # one replica: every range meets
    yield handle, good
    serve.delete(APP_NAME)


def _inspect(handle: DeploymentHandle, seed: int, line: str) -> ScoredImage | Exception:
    image = synth_image(seed, SIZE)[0].astype(np.float32) / 255
    try:
        return handle.inspect.remote(image, None, line).result(timeout_s=120)
    except Exception as exc:  # the test looks at which images failed, and why
        return exc


def test_a_broken_default_version_fails_only_its_own_images(
    broken_default: tuple[DeploymentHandle, ModelCard],
) -> None:
    handle, good = broken_default
    lines = ["press-2", "default"] * 6
    for round_ in range(2):
        if round_:
            time.sleep(LOAD_FAILURE_TTL_S)  # the remembered load failure expires: the broken version is loaded again
        with ThreadPoolExecutor(len(lines)) as pool:  # concurrent images: ranges of both lines share batches
            outcomes = list(pool.map(lambda job: _inspect(handle, job[0], job[1]), enumerate(lines)))
        scored = [o for line, o in zip(lines, outcomes, strict=True) if line == "press-2"]
        failed = [o for line, o in zip(lines, outcomes, strict=True) if line == "default"]
        assert all(isinstance(o, ScoredImage) and o.model_version == good.version for o in scored), scored
        assert all(isinstance(o, Exception) for o in failed), failed
        for error in failed:
            assert f"model version '{BROKEN}'" in str(error) and "not valid safetensors" in str(error), error
