"""Bases as resources: which basis a request gets, 409 instead of a silent synthetic basis, bases built offline.

The served model here is residual-tiny's architecture with perturbed weights (``variant_checkpoint``): a checkpoint
that ships without a basis, the way a user's arrives. Building a basis on the worker (``POST /bases``) is tested
end to end in ``tests/integration/test_bases.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from residual import Basis, load_backbone
from residual.basis import fit_basis
from residual.cli import main as cli_main
from residual.heads import unit_spectra
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.api.app import create_app
from service.errors import Conflict, NotFound
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisStore, basis_id
from tests.processes import variant_checkpoint
from tests.redis_server import RedisServer
from tests.service.conftest import make_settings, wait_ready

NEEDS_A_BASIS = [("GET", "/heads", None), ("GET", "/heads/1/2", None), ("GET", "/heads/spectrum.png", None),
                 ("GET", "/heads/0/0/spectrum.png", None),
                 ("POST", "/heads/alignment", {"dataset": "world:colour", "world_sizes": {"score": 20, "eval": 20}}),
                 ("POST", "/fit-alignment", {"name": "needs-basis", "dataset": "world:colour"})]


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return variant_checkpoint(tmp_path_factory.mktemp("weights") / "variant.safetensors")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, variant: Path,
           redis_server: RedisServer) -> Iterator[tuple[TestClient, Path]]:
    artifacts = tmp_path_factory.mktemp("variant-artifacts")
    app = create_app(make_settings(artifacts, redis_server.url, model_weights=str(variant), heads_sample_images=40))
    with TestClient(app) as c:
        wait_ready(c)
        yield c, artifacts


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 world images as PNG files in a flat folder (no labels)."""
    root = tmp_path_factory.mktemp("images")
    images, _, _ = tasks.task_images("shape", "train", n=60)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / f"{i:03d}.png")
    return root


def _error(r: object) -> str:
    return r.json()["error"]["message"]  # type: ignore[attr-defined]


def test_without_a_basis_every_route_built_on_one_answers_409_and_says_how_to_make_one(
        served: tuple[TestClient, Path]) -> None:
    client, artifacts = served
    assert not list((artifacts / "bases").glob("*")) if (artifacts / "bases").exists() else True
    listing = client.get("/bases").json()
    assert listing["bases"] == [] and listing["default"]["basis_id"] is None
    assert "POST /bases" in listing["default"]["problem"]
    for method, path, body in NEEDS_A_BASIS:
        r = client.request(method, path, json=body)
        assert r.status_code == 409, (path, r.status_code, r.text)
        assert "POST /bases" in _error(r) and "no basis exists for the served weights" in _error(r), path
    # and nothing was built from the synthetic world behind the user's back
    assert not (artifacts / "bases").exists() or not list((artifacts / "bases").glob("*.safetensors"))


def test_a_basis_written_offline_by_the_cli_is_listed_served_and_named(
        served: tuple[TestClient, Path], variant: Path, image_folder: Path, tmp_path: Path) -> None:
    client, artifacts = served
    out = tmp_path / "offline.safetensors"
    assert cli_main(["spectrum", "--model", "residual-tiny", "--pretrained", str(variant), "--device", "cpu",
                     "--images", str(image_folder), "--batch-size", "16", "--name", "my-offline",
                     "--out", str(out)]) == 0
    offline = Basis.load(out)
    # the CLI's streaming PCA equals the library's on the same images in one batch
    bb = load_backbone("residual-tiny", str(variant), device="cpu")
    pixels = torch.stack([bb.preprocess(Image.open(f).convert("RGB")) for f in sorted(image_folder.iterdir())])
    direct = fit_basis(bb, [pixels])
    torch.testing.assert_close(offline.eigenvalues, direct.eigenvalues, rtol=1e-3, atol=1e-6)
    assert offline.weights_id == bb.weights_id and offline.n_samples == 60

    (artifacts / "bases").mkdir(parents=True, exist_ok=True)
    shutil.copy(out, artifacts / "bases" / "dropped-in-under-any-name.safetensors")
    bid = basis_id(offline.hash)
    listing = client.get("/bases").json()
    assert [b["basis_id"] for b in listing["bases"]] == [bid]
    row = listing["bases"][0]
    assert row["name"] == "my-offline" and row["n_images"] == 60 and row["source"]["kind"] == "images"
    assert listing["default"] == {"basis_id": bid, "rule": "the newest basis of the served weights", "problem": None}
    expected_k90 = [r.k_90 for r in unit_spectra(offline) if r.type == "head"]
    assert row["k_90"]["max"] == max(expected_k90) and row["k_90"]["min"] == min(expected_k90)

    by_name, by_id = client.get("/bases/my-offline"), client.get(f"/bases/{bid}")
    assert by_name.status_code == by_id.status_code == 200 and by_name.json() == by_id.json()
    units = by_id.json()["units"]
    assert len(units) == offline.geometry.n_units and units[0]["unit"] == "emb"
    assert [u["k_90"] for u in units] == [r.k_90 for r in unit_spectra(offline)]

    heads = client.get("/heads")
    assert heads.status_code == 200, heads.text
    body = heads.json()
    assert body["basis"] == {"basis_id": bid, "name": "my-offline", "source": offline.source, "n_images": 60}
    assert [u["k_90"] for u in body["units"]] == [r.k_90 for r in unit_spectra(offline)]
    # the server cannot read the folder the basis came from: no TwoNN sample, and it says so
    assert body["twonn_samples"] == 0 and "POST /bases" in body["twonn_note"]
    assert client.get("/heads", params={"basis": "my-offline"}).json() == body
    detail = client.get("/heads/1/2").json()
    assert detail["basis"]["basis_id"] == bid and detail["description"] is None and detail["components"]
    assert client.get("/heads/0/0/spectrum.png", params={"basis": bid}).status_code == 200


def test_a_basis_of_other_weights_is_listed_only_on_request_and_refused(served: tuple[TestClient, Path]) -> None:
    client, artifacts = served
    (artifacts / "bases").mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped_basis_path(), artifacts / "bases" / "tiny-copy.safetensors")
    tiny = basis_id(Basis.load(shipped_basis_path()).hash)
    assert tiny not in [b["basis_id"] for b in client.get("/bases").json()["bases"]]
    assert tiny in [b["basis_id"] for b in client.get("/bases", params={"all_weights": True}).json()["bases"]]
    for path in (f"/bases/{tiny}", f"/heads?basis={tiny}"):
        r = client.get(path)
        assert r.status_code == 409 and "other model weights" in _error(r), (path, r.text)
    r = client.post("/fit-alignment", json={"name": "other-weights", "dataset": "world:colour", "basis": tiny})
    assert r.status_code == 409, r.text
    assert client.get("/bases/b-0000000000000000").status_code == 404
    assert client.get("/heads", params={"basis": "no-such-basis"}).status_code == 404


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"name": "ok", "dataset": "world:nope"}, 422, "unknown world task"),
    ({"name": "ok", "dataset": "ds-" + "0" * 20}, 404, "dataset"),
    ({"name": "../up", "dataset": "world:shape"}, 422, "basis name"),
    ({"name": "b-0123456789abcdef", "dataset": "world:shape"}, 422, "looks like a basis id"),
    ({"name": "reference", "dataset": "world:shape"}, 422, "reserved"),
    ({"name": "ok", "dataset": "world:shape", "max_images": 1}, 422, "max_images"),
    ({"name": "ok", "dataset": "world:shape", "extra": 1}, 422, "extra"),
])
def test_post_bases_refuses_bad_requests_with_4xx(served: tuple[TestClient, Path], body: dict, status: int,
                                                  words: str) -> None:
    r = served[0].post("/bases", json=body)
    assert r.status_code == status and words in r.text, r.text


def test_tiny_serves_its_shipped_basis_by_default(client: TestClient) -> None:
    listing = client.get("/bases").json()
    shipped = Basis.load(shipped_basis_path())
    assert listing["default"]["basis_id"] == basis_id(shipped.hash)
    assert listing["default"]["rule"] == "the basis shipped with the weights"
    row = next(b for b in listing["bases"] if b["basis_id"] == basis_id(shipped.hash))
    assert row["shipped"] and row["name"] == "residual-tiny-reference" and row["source"]["kind"] == "world"


# ---- the default rules, on the store itself ------------------------------------------------------------------------


def _store_with(tmp_path: Path, weights: Path, setting: str | None) -> tuple[BasisStore, list[Basis]]:
    bb = load_backbone("residual-tiny", str(weights), device="cpu")
    store = BasisStore(ArtifactStore(tmp_path), bb, setting)
    made = []
    for i, name in enumerate(("older", "newer")):
        images = np.random.default_rng(i).integers(0, 255, (24, 48, 48, 3), dtype=np.uint8)
        made.append(fit_basis(bb, [bb.pixels_from_arrays(images)], name=name, source={"kind": "test"}))
        info = store.save(made[-1])
        t = 1_700_000_000 + i * 100  # distinct modification times: "newest" is well defined
        os.utime(info.path, (t, t))
    return store, made


def test_default_basis_rules(tmp_path: Path, variant: Path) -> None:
    store, (older, newer) = _store_with(tmp_path / "a", variant, None)
    assert store.resolve(None).basis_id == basis_id(newer.hash)  # type: ignore[union-attr]
    assert store.resolve("older").basis_id == basis_id(older.hash)  # type: ignore[union-attr]
    named, _ = _store_with(tmp_path / "b", variant, "older")
    assert named.resolve("reference").basis_id == basis_id(older.hash)  # type: ignore[union-attr]
    missing, _ = _store_with(tmp_path / "c", variant, "not-there")
    with pytest.raises(Conflict, match="RESIDUAL_REFERENCE_BASIS names 'not-there'"):
        missing.resolve(None)
    with pytest.raises(NotFound):
        missing.resolve("not-there-either")
    world, _ = _store_with(tmp_path / "d", variant, "world")
    assert world.resolve(None) is None  # opted in, not built yet: the caller builds the world basis
    bb = load_backbone("residual-tiny", str(variant), device="cpu")
    with pytest.raises(Conflict, match="POST /bases"):
        BasisStore(ArtifactStore(tmp_path / "empty"), bb, None).resolve(None)
