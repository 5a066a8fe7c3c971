"""Shared test helpers: compose the real Hydra config, shrink it, run it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from ablate.compose import compose

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ABLATE_DATA") or REPO.parent / "shared" / "data" / "cifar10-jpeg")
needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(),
                                reason=f"real CIFAR-10 copy not found at {DATA} (set ABLATE_DATA)")

# Fast, data-free settings for exercising code paths: synthetic images, smoke scale, no bars.
SMOKE = ["scale=smoke", "data=synthetic", "progress=false"]


def make_cfg(*overrides: str) -> DictConfig:
    """Compose conf/config.yaml exactly as `python -m ablate.run` would, with overrides."""
    return compose(overrides)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The decoded-data cache: $ABLATE_CACHE when set (CI keeps it for the whole run)."""
    env = os.environ.get("ABLATE_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("ablate-cache")
