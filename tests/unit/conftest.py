from __future__ import annotations

import pytest
import torch

from residual import Backbone, load_backbone


@pytest.fixture(scope="session")
def tiny_random() -> Backbone:
    """The embedded architecture with seeded random weights (fast; independent of the shipped checkpoint)."""
    torch.manual_seed(1234)
    return load_backbone("residual-tiny", pretrained="random", device="cpu")


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    """The shipped, trained residual-tiny."""
    return load_backbone("residual-tiny", device="cpu")
