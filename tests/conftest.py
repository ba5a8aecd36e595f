"""Shared fixtures: small, randomly initialised models built once per test session."""

from __future__ import annotations

import os

# Tests never reach the network: hub lookups fail at once instead of waiting on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import ovseg
from ovseg.backbones import load_backbone


# Seeded, so that a test sees the same random weights whichever test asked for them first.
@pytest.fixture(scope="session")
def toy_vit():
    torch.manual_seed(0)
    return load_backbone("toy-vit", "random")


@pytest.fixture(scope="session")
def toy_convnext():
    torch.manual_seed(1)
    return load_backbone("toy-convnext", "random")


@pytest.fixture(scope="session")
def dense_clip(toy_vit):
    return ovseg.load("dense-clip", backbone=toy_vit, input_size=128)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
