"""Shared fixtures: the real demo pipeline (built once) and small settings that run in seconds on 2 cores."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import RunSettings
from lowvram_studio.userdirs import DATA_ENV


@pytest.fixture(scope="session", autouse=True)
def private_data_dir(tmp_path_factory):
    """Projection caches, queues and outputs of the tests go to a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_ENV, str(tmp_path_factory.mktemp("user-data")))
        yield


@pytest.fixture(scope="session")
def demo_pipeline():
    return build_demo_pipeline()


@pytest.fixture(scope="session")
def small_settings() -> RunSettings:
    return RunSettings(height=64, width=64, num_frames=8, num_inference_steps=4, seed=0)


@pytest.fixture(scope="session")
def test_image() -> PIL.Image.Image:
    """A smooth colourful 64x64 image (gradients and a disc), the same in every run."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.5 * disc], axis=-1)
    return PIL.Image.fromarray((rgb * 255).astype(np.uint8))
