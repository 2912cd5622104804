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
                 "--basis", str(shipped_basis_path()), "--json"]) == 0
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


def test_help_never_loads_torch() -> None:
    """`residual --help` answers without importing torch (the library's public names load on first use)."""
    import subprocess
    import sys

    code = ("import sys\nfrom residual.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['classify', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "False"
    assert "tasks: background, colour, count, digit, position, shape, size, texture" in " ".join(done.stdout.split())


def test_cli_variants_are_the_library_variants() -> None:
    from residual import VARIANTS
    from residual.cli import VARIANTS as CLI_VARIANTS

    assert CLI_VARIANTS == VARIANTS


def test_classify_files_flat_folders_and_class_folders(folder: Path, tmp_path: Path, capsys) -> None:
    task = tasks.TASKS["colour"]
    classes = ",".join(task.classes)
    flat = tmp_path / "flat"
    flat.mkdir()
    files = sorted((folder / task.classes[0]).iterdir())[:2] + sorted((folder / task.classes[1]).iterdir())[:1]
    for f in files:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    assert main(["classify", "--device", "cpu", str(files[0]), str(files[1]), "--classes", classes,
                 "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(files[0]))
    assert all(len(line.split("\t")) == 4 for line in lines)  # the file, then 3 labels with scores
    assert main(["classify", "--device", "cpu", str(flat), "--classes", classes, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).parent for r in body["results"]] == [flat] * 3 and "accuracy" not in body
    assert body["label_set"]["templates"] == ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]
    top = body["results"][0]["top"]
    assert len(top) == 5 and abs(sum(p["score"] for p in top)) <= 1 + 1e-6
    assert main(["classify", "--device", "cpu", str(folder), "--json", "--top-k", "1"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert sorted(tree["label_set"]["classes"]) == sorted(task.classes) and 0 <= tree["accuracy"] <= 1
    assert len(tree["results"]) == 70


@pytest.mark.parametrize(("argv", "message"), [
    (["classify", "/nonexistent/cat.png", "--classes", "a,b"], "error: /nonexistent/cat.png: no such file or folder"),
    (["classify", "--world", "nope"], "error: unknown world task 'nope'; choose from background, colour, count, "
                                      "digit, position, shape, size, texture"),
    (["classify", "--world", "shape:dev"], "error: unknown split 'dev' of world task 'shape'; choose train, val or "
                                           "test"),
])
def test_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == message and "Traceback" not in err
