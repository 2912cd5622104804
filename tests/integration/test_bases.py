"""Bases built from the user's own images on the worker (``POST /bases``), then used end to end.

- A checkpoint without a shipped basis (residual-tiny's architecture, perturbed weights): an uploaded dataset
  becomes a basis equal to the library's PCA of the same images; it becomes the default, ``/heads`` names it and
  describes heads on the dataset's images, a fit uses it by id, ``/classify`` serves the fitted set. A world-task
  basis, and the cancellation of a long build, too.
- The formats users bring: an open_clip ViT-B-32 (random init) as a plain state dict (``.pt``, loaded with
  ``weights_only=True``) and as ``.safetensors``, each through ``POST /bases`` on an uploaded dataset, a fit and
  ``/classify`` with the fitted set. Small image counts: sized for CI.
"""

from __future__ import annotations

import base64
import io
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from residual import Basis, load_backbone
from residual.basis import fit_basis
from residual.tiny import tasks
from tests.processes import api_server, variant_checkpoint, worker_process
from tests.redis_server import RedisServer, start_private
from tests.waiting import wait_for

TASK = tasks.TASKS["shape"]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = start_private()  # its own queue: no other test's worker takes these jobs
    yield server
    server.stop()


def _dataset(per_class: int) -> tuple[bytes, dict[str, list[Image.Image]]]:
    """A tar in ImageFolder layout of world shape images (PNG), and the images by class in archive order."""
    images, labels, _ = tasks.task_images("shape", "train", n=per_class * len(TASK.classes))
    by_class: dict[str, list[Image.Image]] = {c: [] for c in TASK.classes}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(im).save(png, "PNG")
            info = tarfile.TarInfo(f"{TASK.classes[lab]}/{i:04d}.png")
            info.size = png.tell()
            tf.addfile(info, io.BytesIO(png.getvalue()))
            by_class[TASK.classes[lab]].append(Image.fromarray(im))
    return buf.getvalue(), by_class


def _wait_job(client: httpx.Client, url: str, timeout: float = 600) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(url).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"{url} to finish")


def _service(redis: RedisServer, artifacts: Path, **settings: str) -> Any:
    """(worker process, api_server context) serving the same weights on one volume and one queue."""
    return worker_process(redis.url, artifacts, **settings), api_server(redis.url, artifacts, ready_timeout=300,
                                                                         **settings)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.kill()
    worker.wait(timeout=30)


def _build_basis(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/bases", json=body)
    assert r.status_code == 202, r.text
    job = _wait_job(client, r.json()["status_url"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "basis" and job["progress"]["images"] == job["progress"]["total"] > 0, job
    return job["basis"]


def _library_basis(bb_args: tuple[str, str], images: dict[str, list[Image.Image]]) -> Basis:
    """The same images through the library alone, in archive order (class folders sorted, files sorted)."""
    bb = load_backbone(*bb_args, device="cpu")
    pixels = torch.stack([bb.preprocess(im.convert("RGB")) for c in sorted(images) for im in images[c]])
    return fit_basis(bb, [pixels])


def test_a_basis_from_an_uploaded_dataset_drives_heads_fits_and_classify(redis: RedisServer, tmp_path: Path) -> None:
    weights = variant_checkpoint(tmp_path / "variant.safetensors")
    artifacts = tmp_path / "artifacts"
    archive, by_class = _dataset(per_class=20)
    worker, api = _service(redis, artifacts, model_weights=str(weights), heads_sample_images="30")
    try:
        with api as (client, _):
            assert client.get("/heads").status_code == 409  # nothing yet, and nothing synthetic
            ds = client.post("/datasets", content=archive, headers={"content-type": "application/x-tar"})
            assert ds.status_code == 201, ds.text
            dataset_id = ds.json()["dataset_id"]
            made = _build_basis(client, {"name": "my-shapes", "dataset": dataset_id})
            assert made["name"] == "my-shapes" and made["n_images"] == 20 * len(TASK.classes)
            assert made["source"] == {"kind": "dataset", "dataset": dataset_id, "n": 20 * len(TASK.classes)}

            # the worker's streaming PCA (chunks of 256, decoded from the stored files) is the library's PCA
            stored = Basis.load(artifacts / "bases" / f"{made['basis_id']}.safetensors")
            direct = _library_basis(("residual-tiny", str(weights)), by_class)
            assert stored.weights_id == direct.weights_id and stored.n_samples == direct.n_samples
            torch.testing.assert_close(stored.eigenvalues, direct.eigenvalues, rtol=1e-3, atol=1e-7)
            torch.testing.assert_close(stored.mean, direct.mean, rtol=1e-4, atol=1e-6)

            listing = client.get("/bases").json()
            assert listing["default"]["basis_id"] == made["basis_id"]
            heads = client.get("/heads").json()
            assert heads["basis"]["basis_id"] == made["basis_id"] and heads["basis"]["name"] == "my-shapes"
            assert heads["twonn_samples"] == 30  # the sample comes from the dataset behind the basis
            detail = client.get("/heads/2/1").json()
            assert detail["description"]["samples"] == 30 and detail["basis"]["basis_id"] == made["basis_id"]
            align = client.post("/heads/alignment", json={"dataset": dataset_id, "label_set": {
                "classes": list(TASK.classes)}, "basis": made["basis_id"]})
            assert align.status_code == 200, align.text
            assert align.json()["basis"]["basis_id"] == made["basis_id"] and "k_90" in align.json()["heads"][0]

            fit = client.post("/fit-alignment", json={
                "name": "my-shapes-fit", "dataset": dataset_id, "label_set": {"classes": list(TASK.classes)},
                "basis": "my-shapes", "hyperparameters": {"epochs": 3, "patience": 3}})
            assert fit.status_code == 202, fit.text
            job = _wait_job(client, fit.json()["status_url"])
            assert job["status"] == "succeeded", job
            assert job["basis"]["basis_id"] == made["basis_id"] == job["report"]["basis"]["basis_id"]
            images, labels, _ = tasks.task_images("shape", "test", n=16)
            files = [("images", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
            r = client.post("/classify", files=files, data={"coefficients": "my-shapes-fit"})  # its own label set
            assert r.status_code == 200, r.text
            assert r.json()["coefficients"] == job["coefficients"] and len(r.json()["results"]) == 16
            assert r.json()["basis"]["basis_id"] == made["basis_id"]  # the response names the basis it stands on

            world = _build_basis(client, {"name": "world-shape", "dataset": "world:shape", "max_images": 300})
            assert world["source"] == {"kind": "world-task", "task": "shape", "split": "train", "n": 300}
            assert client.get("/bases").json()["default"]["basis_id"] == world["basis_id"]  # the newest
            assert client.get("/heads", params={"basis": "my-shapes"}).json()["basis"]["basis_id"] == \
                made["basis_id"]

            long = client.post("/bases", json={"name": "cancelled", "dataset": "world:mixture", "max_images": 10_000})
            url = long.json()["status_url"]
            wait_for(lambda: client.get(url).json()["progress"].get("images", 0) > 0, 300,
                     "the long build to make progress")
            assert client.delete(url).status_code == 200
            assert _wait_job(client, url)["status"] == "cancelled"
            names = [b["name"] for b in client.get("/bases").json()["bases"]]
            assert "cancelled" not in names and not list(artifacts.rglob("*.tmp"))
    finally:
        _stop(worker)


def _png(a: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vit_b_32_checkpoints_as_users_bring_them(redis: RedisServer, tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}
    weights = tmp_path / f"vit-b-32{suffix}"
    if suffix == ".pt":
        torch.save(state, weights)  # a plain state dict: loaded with weights_only=True
    else:
        save_file(state, str(weights))
    expected_id = load_backbone("ViT-B-32", str(weights), device="cpu").weights_id
    artifacts = tmp_path / "artifacts"
    archive, _ = _dataset(per_class=4)
    worker, api = _service(redis, artifacts, model_name="ViT-B-32", model_weights=str(weights),
                           heads_sample_images="12")
    try:
        with api as (client, _):
            assert client.get("/readyz").json()["weights_id"] == expected_id
            assert client.get("/heads").status_code == 409
            dataset_id = client.post("/datasets", content=archive,
                                     headers={"content-type": "application/x-tar"}).json()["dataset_id"]
            made = _build_basis(client, {"name": f"vit{suffix.replace('.', '-')}", "dataset": dataset_id})
            assert made["weights_id"] == expected_id and made["n_images"] == 4 * len(TASK.classes)
            heads = client.get("/heads").json()
            assert heads["basis"]["basis_id"] == made["basis_id"] and len(heads["units"]) == 1 + 12 + 12 * 12
            fit = client.post("/fit-alignment", json={
                "name": "vit-fit", "dataset": dataset_id, "label_set": {"classes": list(TASK.classes)},
                "basis": made["basis_id"], "hyperparameters": {"epochs": 2, "patience": 2}})
            job = _wait_job(client, fit.json()["status_url"])
            assert job["status"] == "succeeded" and job["basis"]["basis_id"] == made["basis_id"], job
            images, _, _ = tasks.task_images("shape", "test", n=4)
            body = {"images": [base64.b64encode(_png(im)).decode() for im in images],
                    "label_set": {"classes": list(TASK.classes)}, "coefficients": "vit-fit", "top_k": len(TASK.classes)}
            r = client.post("/classify", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["coefficients"] == job["coefficients"] and out["weights_id"] == expected_id
            assert out["basis"]["basis_id"] == made["basis_id"]
            for res in out["results"]:
                assert sorted(p["label"] for p in res["top"]) == sorted(TASK.classes)
                assert abs(sum(p["score"] for p in res["top"]) - 1) < 1e-4
            zero = client.post("/classify", json={**body, "coefficients": None}).json()
            assert zero["basis"] is None
            assert zero["results"] != out["results"]  # the fitted set changed the scores
    finally:
        _stop(worker)
