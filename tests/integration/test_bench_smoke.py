"""Every benchmark runs in smoke mode, so none of them rots."""

from __future__ import annotations

import json
import os
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
    result = _run("bench/serving.py", "--smoke", tmp=tmp_path)
    assert {(r["transport"], r["batching"]) for r in result["rows"]} == {
        (t, b) for t in ("json", "multipart") for b in (True, False)}
    for row in result["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0
        assert {"clients", "transport", "format", "batching", "images_per_s", "p50_ms", "p95_ms", "p99_ms",
                "vs_in_process"} <= set(row)
        assert row["vs_in_process"] > 0
    assert result["in_process_images_per_s"]


def test_backbone_smoke(tmp_path: Path) -> None:
    result = _run("bench/backbone.py", "--smoke", tmp=tmp_path)
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("residual-tiny", 1), ("residual-tiny", 8)]
    for row in result["rows"]:
        ips = row["images_per_s"]
        assert set(ips) == {"plain", "capture", "fused_full", "fused_fine", "naive_full"}
        assert all(0 < v < 1e6 for v in ips.values())
        assert row["fused_full_vs_plain"] == ips["fused_full"] / ips["plain"]
        # what is timed is also right: capture gives the plain logits, fused full the unfused formula's
        assert row["max_relative_difference"]["capture_vs_plain"] < 1e-4
        assert row["max_relative_difference"]["fused_full_vs_naive"] < 1e-3


def test_heads_smoke(tmp_path: Path) -> None:
    result = _run("bench/heads.py", "--smoke", tmp=tmp_path)
    assert set(result["tasks"]) == {"shape", "colour", "size", "position", "background", "texture", "digit", "count"}
    for t in result["tasks"].values():
        assert len(t["heads"]) == 24 and len(t["best_head_description"]) == 5


def test_multi_adapter_smoke(tmp_path: Path) -> None:
    result = _run("bench/multi_adapter.py", "--smoke", tmp=tmp_path)
    assert [r["k"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["max_abs_difference"] < 1e-4  # one shared batch gives each set's own answers
        assert row["mixed_vs_separate"] == row["images_per_s"]["mixed"] / row["images_per_s"]["separate"]
        assert all(0 < v < 1e6 for v in row["images_per_s"].values())


def test_many_sets_smoke(tmp_path: Path) -> None:
    result = _run("bench/many_sets.py", "--smoke", tmp=tmp_path)
    assert [r["sets"] for r in result["rows"]] == [1, 20]
    assert result["distinct_answers"] == 20  # every set was applied: random lambdas, 20 different top scores
    one = result["rows"][0]["images_per_s"]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["images_per_s"] > 0 and row["p95_ms"] > 0
        assert abs(row["vs_one_set"] - row["images_per_s"] / one) < 2e-3  # from unrounded rates
        assert row["resident_sets"] == 20 and row["resident_bytes"] > 20 * 500_000  # 0.85 MB a tiny set


def test_drift_smoke(tmp_path: Path) -> None:
    result = _run("bench/drift.py", "--smoke", tmp=tmp_path)
    assert len(result["rounds_images_per_s"]["on"]) == len(result["rounds_images_per_s"]["off"]) == 2  # two pairs
    assert all(v > 0 for vs in result["rounds_images_per_s"].values() for v in vs)
    assert result["drift_images_counted"] > 0 and result["drift_images_skipped"] == 0
    assert 0 < result["drift_cpu_share"] < 0.5
    assert abs(result["on_vs_off"] - result["images_per_s"]["on"] / result["images_per_s"]["off"]) < 2e-3


def test_tracing_smoke(tmp_path: Path) -> None:
    """Traces exported over OTLP/HTTP reach a collector (the bench's stub) from a real API process."""
    result = _run("bench/tracing.py", "--smoke", tmp=tmp_path)
    assert all(v > 0 for vs in result["rounds_images_per_s"].values() for v in vs)
    assert result["collector_exports"] >= 1 and result["collector_bytes"] > 1000
    assert abs(result["on_vs_off"] - result["images_per_s"]["on"] / result["images_per_s"]["off"]) < 2e-3


def test_text_cache_smoke(tmp_path: Path) -> None:
    from tests.redis_server import shared_or_private

    server = shared_or_private()
    try:
        out = tmp_path / "out.json"
        subprocess.run([sys.executable, "bench/text_cache.py", "--smoke", "--json", str(out)], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RESIDUAL_REDIS_URL": server.url})
        rows = json.loads(out.read_text())["rows"]
    finally:
        server.stop()
    assert [r["classes"] for r in rows] == [10, 50]
    assert all(r["prompts_encoded_cold"] == 4 * r["classes"] for r in rows)


def test_fit_scaling_smoke(tmp_path: Path) -> None:
    rows = _run("bench/fit_scaling.py", "--smoke", tmp=tmp_path)["rows"]
    assert [r["images"] for r in rows] == [100, 300] and set(rows[1]["growth"]) == {"render", "extract", "fit"}
    # cached features grow exactly with the images (the same bytes per image), and the fit learned something
    assert abs(rows[1]["feature_cache_mib"] / rows[0]["feature_cache_mib"] - 3.0) < 1e-6
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in rows)


def test_gpu_script_runs_on_cpu(tmp_path: Path) -> None:
    result = _run("bench/gpu.py", "--smoke", tmp=tmp_path)
    assert result["matmul_tflops"] > 0 and result["rows"][0]["model"] == "ViT-B-16"
    assert result["rows"][0]["images_per_s"]["fused_full"] > 0


def test_soak_smoke(tmp_path: Path) -> None:
    from tests.redis_server import shared_or_private

    server = shared_or_private()
    try:
        out = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, "bench/soak.py", "--smoke", "--json", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RESIDUAL_REDIS_URL": server.url})
    finally:
        server.stop()
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result["all_5xx"] == 0 and result["valid_ok"] > 0 and not result["transport_errors"]
    assert all(result["statuses"][k] for k in ("bomb", "lying_length", "classify_multipart"))


def test_supervised_shape_diagnostic_runs() -> None:
    proc = subprocess.run([sys.executable, "bench/tiny_supervised_shape.py", "--steps", "2", "--batch-size", "16",
                           "--every", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [int(f[1]) for f in lines] == [1, 2]
    assert all(float(f[3]) > 0 and 0.0 <= float(f[5]) <= 1.0 for f in lines)  # loss, accuracy


def test_attacks_smoke(tmp_path: Path) -> None:
    from tests.redis_server import shared_or_private

    server = shared_or_private()
    try:
        out = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, "bench/attacks.py", "--smoke", "--only", "unauthenticated_flood",
                               "huge_images", "oversized_headers", "--json", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "RESIDUAL_REDIS_URL": server.url})
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["attack"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none (baseline)", "unauthenticated_flood", "huge_images", "oversized_headers"]
    for row in rows.values():
        assert set(row["statuses"]) == {"200"} and row["requests"] > 0  # the normal client was always answered
        assert row["vs_baseline_p50"] == round(row["p50_ms"] / rows["none (baseline)"]["p50_ms"], 2)
    assert set(rows["unauthenticated_flood"]["attack_outcomes"]) == {"401"}
    assert set(rows["huge_images"]["attack_outcomes"]) == {"413"}
    assert set(rows["oversized_headers"]["attack_outcomes"]) == {"431"}
