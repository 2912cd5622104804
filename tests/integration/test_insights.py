"""What the service says about a label set, a basis and a fit, against a real API process, worker and Redis:
basis comparison (the paper's Experiment 2), label-set diagnosis, and the automatic variant."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from residual import Basis, basis_similarity, class_embeddings, load_backbone
from residual.diagnosis import closest_pairs, head_text_share
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from tests.pictures import assert_picture
from tests.processes import api_server, variant_checkpoint, worker_process
from tests.redis_server import start_private
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("insights")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[httpx.Client]:
    redis = start_private()
    variant = variant_checkpoint(tmp_path_factory.mktemp("weights") / "variant.safetensors")
    models = json.dumps([{"name": "residual-tiny", "architecture": "residual-tiny"},
                         {"name": "tiny-variant", "architecture": "residual-tiny", "weights": str(variant)}])
    worker = worker_process(redis.url, artifacts, models=models)
    try:
        with api_server(redis.url, artifacts, ready_timeout=300, models=models) as (client, _):
            yield client
    finally:
        worker.kill()
        worker.wait(timeout=30)
        redis.stop()


def _job(client: httpx.Client, url: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(url).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 600, f"{url} to finish")
    assert job["status"] == "succeeded", job
    return job


def test_two_bases_compared_unit_by_unit(api: httpx.Client) -> None:
    shipped = api.get("/bases").json()["default"]["basis_id"]
    r = api.post("/bases", json={"name": "position-300", "dataset": "world:position", "max_images": 300})
    assert r.status_code == 202, r.text
    other = _job(api, r.json()["status_url"])["basis"]["basis_id"]

    same = api.get(f"/bases/{shipped}/compare/{shipped}").json()
    assert all(u["similarity"] == pytest.approx(1.0, abs=1e-5) for u in same["units"])
    ab = api.get(f"/bases/{shipped}/compare/{other}").json()
    ba = api.get(f"/bases/position-300/compare/{shipped}").json()  # by name, the other way round
    assert ab["a"]["basis_id"] == shipped and ab["b"]["basis_id"] == other and ba["a"]["basis_id"] == other
    assert [u["similarity"] for u in ab["units"]] == [u["similarity"] for u in ba["units"]]  # symmetric
    # the library's own comparison of the two files gives the same numbers
    art = Basis.load(shipped_basis_path())
    heads = [u for u in ab["units"] if ".H" in u["unit"]]
    assert len(heads) == art.geometry.layers * art.geometry.heads
    assert ab["summary"]["heads_min"] == min(u["similarity"] for u in heads) < ab["summary"]["heads_mean"] < 1
    assert ab["summary"]["least_similar_heads"][0] == min(heads, key=lambda u: u["similarity"])["unit"]
    assert_picture(api.get(f"/bases/{shipped}/compare/{other}.png").content)
    # a basis of other weights is another model's: its units are not these units
    r = api.get(f"/bases/{shipped}/compare/{shipped}", params={"model": "tiny-variant"})
    assert r.status_code == 409 and "belongs to model 'residual-tiny'" in r.json()["error"]["message"]
    assert api.get(f"/bases/{shipped}/compare/b-0000000000000000").status_code == 404


def test_basis_similarity_matches_the_library(api: httpx.Client, artifacts: Path) -> None:
    """The route's numbers are the library's on the same two files (the shipped basis and the world-task basis the
    worker built in the test above), at another tau too."""
    built = api.get("/bases/position-300").json()["basis_id"]
    shipped = api.get("/bases").json()["default"]["basis_id"]
    units = api.get(f"/bases/{shipped}/compare/{built}", params={"tau": 0.5}).json()["units"]
    expected = basis_similarity(Basis.load(shipped_basis_path()), Basis.load(artifacts / "bases" /
                                                                             f"{built}.safetensors"), 0.5)
    assert [u["similarity"] for u in units] == pytest.approx(expected.clamp(max=1).tolist(), abs=1e-6)


def _png(array: Any) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_label_set_diagnosed_on_its_world_task(api: httpx.Client) -> None:
    task = tasks.TASKS["shape"]
    r = api.post("/label-sets/diagnose", json={"dataset": "world:shape", "images": 120, "top": 5})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["model"] == "residual-tiny" and d["classes"] == list(task.classes)
    bb = load_backbone("residual-tiny", device="cpu")
    cls = class_embeddings(bb.encode_text, bb.tokenizer, list(task.classes), list(task.templates), device="cpu")
    assert [(p["a"], p["b"]) for p in d["pairs"]] == [(p["a"], p["b"]) for p in closest_pairs(
        cls, list(task.classes), 5)]
    shares = head_text_share(Basis.load(shipped_basis_path()), cls)
    best = shares.argsort(descending=True)[:5].tolist()
    g = bb.geometry
    assert [(h["layer"], h["head"]) for h in d["heads"]] == [(b // g.heads, b % g.heads) for b in best]
    assert all(0 <= h["text_share"] <= 1 for h in d["heads"])

    # the data part is what /classify answers on the same images (the task's val split)
    images, labels, _ = tasks.task_images("shape", "val", n=120)
    predicted = []
    for i in range(0, len(images), 40):
        body = {"images": [_png(a) for a in images[i : i + 40]], "top_k": 1,
                "label_set": {"classes": list(task.classes), "templates": list(task.templates)}}
        predicted += [res["top"][0]["label"] for res in api.post("/classify", json=body).json()["results"]]
    truth = [task.classes[int(k)] for k in labels]
    data = d["data"]
    assert data["images"] == 120 and data["dataset"] == "world:shape"
    assert data["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, truth, strict=True)) / 120)
    confusion = torch.zeros(len(task.classes), len(task.classes), dtype=torch.int64)
    for p, t in zip(predicted, truth, strict=True):
        confusion[task.classes.index(t), task.classes.index(p)] += 1
    assert data["confusion"] == confusion.tolist()
    for pair in data["confused_pairs"]:
        assert pair["true"] != pair["predicted"]
        assert pair["count"] == confusion[task.classes.index(pair["true"]), task.classes.index(pair["predicted"])]

    # text only, with a model without a basis: the pairs, and a note instead of head shares
    r = api.post("/label-sets/diagnose", json={"label_set": {"classes": ["red", "crimson", "blue"]},
                                               "model": "tiny-variant"})
    assert r.status_code == 200 and r.json()["heads"] is None and "POST /bases" in r.json()["note"]
    assert r.json()["data"] is None and len(r.json()["pairs"]) == 3


def test_auto_variant_keeps_the_best_on_validation(api: httpx.Client) -> None:
    r = api.post("/fit-alignment", json={"name": "auto-colour", "dataset": "world:colour", "variant": "auto",
                                         "world_sizes": {"train": 200, "val": 100, "test": 100},
                                         "hyperparameters": {"epochs": 3}})
    assert r.status_code == 202, r.text
    job = _job(api, r.json()["status_url"])
    table = job["report"]["variants"]
    assert [row["variant"] for row in table] == ["coarse", "fine", "full", "linear"]
    best = max(table, key=lambda row: (row["val_accuracy"], -row["parameters"]))
    assert job["report"]["variant"] == best["variant"]
    assert job["report"]["val_accuracy"] == best["val_accuracy"]
    versions = api.get("/coefficients/auto-colour").json()["versions"]
    assert versions[-1]["variant"] == best["variant"] and versions[-1]["n_parameters"] == best["parameters"]
    assert all(row["seconds"] > 0 and row["test_accuracy"] is not None for row in table)
