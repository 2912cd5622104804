from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from residual.backbone import EMBEDDED_MODELS
from residual.tiny.card import CARD_TEST_SIZE, card_zero_shot
from residual.tiny.train import TrainConfig, train

CARD = json.loads(Path(EMBEDDED_MODELS["residual-tiny"]).with_suffix(".card.json").read_text())


def test_shipped_file_matches_card() -> None:
    path = Path(EMBEDDED_MODELS["residual-tiny"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CARD["file_sha256"]
    assert path.stat().st_size <= 25 * 1024 * 1024


def test_zero_shot_matches_model_card(tiny) -> None:
    measured = card_zero_shot(tiny, CARD_TEST_SIZE)
    for task, expected in CARD["zero_shot_card_set"].items():
        assert measured[task] == pytest.approx(expected, abs=0.011), task  # two images' worth of BLAS noise


def test_training_a_few_steps_lowers_the_loss(tmp_path: Path) -> None:
    record = train(TrainConfig(steps=24, batch_size=32, warmup=4, eval_every=0, lr=2e-3), tmp_path / "w.safetensors")
    losses = np.asarray(record["losses"])
    assert losses.shape == (24,)
    assert losses[-6:].mean() < losses[:6].mean() - 0.1
    assert (tmp_path / "w.safetensors").is_file()
