from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from residual.cli import main
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    task = tasks.TASKS["colour"]
    images, labels, _ = tasks.task_images("colour", "train", n=70)
    for i, (a, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / task.classes[lab]
        d.mkdir(exist_ok=True)
        Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_decompose_check(capsys) -> None:
    assert main(["decompose-check", "--device", "cpu", "--n", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_relative_error"] <= 1e-5 and out["units"] == 31


def test_fit_then_classify_on_an_image_folder(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cs.safetensors"
    assert main(["fit", "--device", "cpu", "--train", str(folder), "--basis", str(shipped_basis_path()),
                 "--out", str(out), "--epochs", "2", "--templates", "a photo of a {} object."]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variant"] == "full" and out.is_file()
    assert main(["classify", "--device", "cpu", "--images", str(folder), "--coefficients", str(out),
                 "--basis", str(shipped_basis_path())]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc > 1 / 7


def test_spectrum_on_world(tmp_path: Path, capsys) -> None:
    out = tmp_path / "basis.safetensors"
    assert main(["spectrum", "--device", "cpu", "--world", "shape:train", "--n", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "head.5.3" in text and out.is_file()


def test_errors_are_reported_not_raised(capsys) -> None:
    assert main(["classify", "--model", "no-such-model", "--world", "shape"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert np.isfinite(1.0)


def test_spectrum_picture_from_a_basis(tmp_path: Path, capsys) -> None:
    png = tmp_path / "k90.png"
    assert main(["spectrum", "--device", "cpu", "--basis", str(shipped_basis_path()), "--png", str(png),
                 "--value", "participation_ratio"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "head.5.3" in capsys.readouterr().out


def test_alignment_on_an_image_folder(folder: Path, tmp_path: Path, capsys) -> None:
    png, report = tmp_path / "align.png", tmp_path / "align.json"
    assert main(["alignment", "--device", "cpu", "--images", str(folder), "--seeds", "2", "--json", str(report),
                 "--png", str(png), "--picture", "ablation", "--templates", "a photo of a {} object."]) == 0
    body = json.loads(report.read_text())
    assert body["split"].startswith("stratified halves") and body["n_score"] + body["n_eval"] == 70
    assert len(body["heads"]) == 24 and png.read_bytes()[:4] == b"\x89PNG"
    assert "top heads by text_correlation" in capsys.readouterr().out
