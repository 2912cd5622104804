"""Every benchmark runs in smoke mode, so none of them rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, tmp: Path) -> dict:
    out = tmp / "out.json"
    subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True,
                   timeout=300)
    return json.loads(out.read_text())


def test_accuracy_smoke(tmp_path: Path) -> None:
    result = _run("bench/accuracy.py", "--smoke", "--tasks", "colour,position", tmp=tmp_path)
    assert [r["task"] for r in result["rows"]] == ["colour", "position"]
    for row in result["rows"]:
        for m in ("zero_shot", "coarse", "fine", "full", "linear_probe", "linear_adapter"):
            assert 0.0 <= row[m] <= 1.0
    assert result["rows"][0]["zero_shot"] > 0.5  # colour is easy for the shipped model


def test_library_smoke(tmp_path: Path) -> None:
    result = _run("bench/library.py", "--smoke", tmp=tmp_path)
    assert result["decomposition_max_relative_error"]["residual-tiny"] <= 1e-5
    assert max(result["fused_vs_unfused_max_relative_error"].values()) <= 1e-4


def test_service_smoke(tmp_path: Path) -> None:
    result = _run("bench/service.py", "--smoke", tmp=tmp_path)
    for row in result["rows"].values():
        assert row["requests"] > 0 and row["errors"] == 0


def test_backbone_smoke(tmp_path: Path) -> None:
    result = _run("bench/backbone.py", "--smoke", tmp=tmp_path)
    for row in result["rows"]:
        assert set(row["images_per_s"]) == {"plain", "capture", "fused_full", "fused_fine", "naive_full"}
        assert all(v > 0 for v in row["images_per_s"].values())
