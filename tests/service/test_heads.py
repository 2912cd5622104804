"""The head-spectrum API against the real embedded model: numbers equal the library's, errors are 4xx."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from residual import Basis, LinearisedLN, class_embeddings, decompose, load_backbone
from residual.dictionary import load_dictionary
from residual.heads import head_alignment
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.bases import basis_id
from tests.service.conftest import png_b64

PNG = b"\x89PNG\r\n\x1a\n"


def test_heads_table_matches_the_shipped_basis(client: TestClient) -> None:
    r = client.get("/heads")
    assert r.status_code == 200, r.text
    body = r.json()
    basis = Basis.load(shipped_basis_path())
    g = basis.geometry
    assert body["basis_hash"] == basis.hash and body["twonn_samples"] > 100
    assert body["basis"] == {"basis_id": basis_id(basis.hash), "name": "residual-tiny-reference",
                             "source": basis.source, "n_images": basis.n_samples}
    units = body["units"]
    assert len(units) == 1 + g.layers + g.layers * g.heads
    k90 = basis.pca().k_at(0.9)
    for row in units:
        assert row["k_90"] == int(k90[row["unit"]])
        assert len(row["evr"]) == 32
        assert row["twonn"] is not None and 0 < row["twonn"] < g.out_dim
        assert row["k_99"] >= row["k_90"] >= 1
    heads = [u for u in units if u["type"] == "head"]
    assert [(u["layer"], u["head"]) for u in heads] == [(l, h) for l in range(g.layers) for h in range(g.heads)]
    assert client.get("/heads").json() == body  # cached, identical


def test_one_head_has_its_spectrum_and_descriptions(client: TestClient) -> None:
    r = client.get("/heads/5/2", params={"atoms": 6, "components": 3, "component_atoms": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    dictionary = set(load_dictionary())
    assert len(body["eigenvalues"]) == len(body["evr"]) == 128
    assert abs(body["evr"][-1] - 1.0) < 1e-4 and body["evr"] == sorted(body["evr"])
    assert len(body["description"]["texts"]) == 6
    assert all(t["text"] in dictionary for t in body["description"]["texts"])
    assert len(body["components"]) == 3
    assert all(len(c["texts"]) == 4 for c in body["components"])
    ts = client.get("/heads/5/2", params={"method": "textspan", "atoms": 3}).json()["description"]
    assert ts["method"] == "textspan" and len(ts["texts"]) == 3


def test_head_errors_are_4xx_with_a_message(client: TestClient) -> None:
    for path, status in (("/heads/6/0", 404), ("/heads/0/4", 404), ("/heads/-1/0", 404), ("/heads/x/0", 422),
                         ("/heads/0/0?method=magic", 422), ("/heads/spectrum.png?value=nope", 422),
                         ("/heads/alignment/not-a-job", 404)):
        r = client.get(path)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.json()["error"]["message"]


def test_pictures(client: TestClient) -> None:
    for path in ("/heads/spectrum.png", "/heads/spectrum.png?value=participation_ratio", "/heads/3/1/spectrum.png"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == PNG, path
    body = {"dataset": "world:colour", "world_sizes": {"score": 60, "eval": 60}}
    for picture in ("heatmap", "ablation"):
        r = client.post(f"/heads/alignment.png?picture={picture}", json=body)
        assert r.status_code == 200, r.text
        assert r.content[:8] == PNG


def test_world_alignment_equals_the_library(client: TestClient) -> None:
    r = client.post("/heads/alignment", json={"dataset": "world:colour", "world_sizes": {"score": 150, "eval": 200},
                                              "seeds": 3, "fractions": [0.05, 0.25]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["heads"]) == 24
    assert sorted(h["rank_text_correlation"] for h in body["heads"]) == list(range(1, 25))
    assert body["ablation"]["k"] == [1, 6]

    bb = load_backbone("residual-tiny", device="cpu")
    ln = LinearisedLN(bb)
    task = tasks.TASKS["colour"]
    s_img, s_lab, _ = tasks.task_images("colour", "val", n=150)
    e_img, e_lab, _ = tasks.task_images("colour", "test", n=200)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, task.classes, task.templates)
    units = decompose(bb, bb.pixels_from_arrays(s_img), ln).units
    ev = decompose(bb, bb.pixels_from_arrays(e_img), ln).units
    ref = head_alignment(units, torch.from_numpy(s_lab), cls, bb.logit_scale, 6, 4, ev, torch.from_numpy(e_lab),
                         fractions=[0.05, 0.25], seeds=3)
    for got, want in zip(body["heads"], ref["heads"], strict=True):
        assert abs(got["text_correlation"] - want["text_correlation"]) < 1e-4
        assert abs(got["supervised"] - want["supervised"]) < 1e-6
    assert body["top_heads"]["text_correlation"][0] == ref["top_heads"]["text_correlation"][0]
    assert body["ablation"]["all_units"] == ref["ablation"]["all_units"]


def test_inline_alignment_and_validation(client: TestClient) -> None:
    images, labels, _ = tasks.task_images("background", "val", n=40)
    classes = list(tasks.TASKS["background"].classes)
    inline = {"images": [png_b64(a) for a in images], "labels": [classes[i] for i in labels]}
    r = client.post("/heads/alignment", json={"label_set": {"classes": classes}, "dataset": inline, "seeds": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dataset"] == "inline" and body["n_score"] + body["n_eval"] == 40
    bad = [
        ({"dataset": "world:nope"}, 422),
        ({"dataset": "world:colour", "label_set": {"classes": ["a", "b"]}}, 422),
        ({"dataset": "world:colour", "fractions": [0.0]}, 422),
        ({"dataset": "world:colour", "label_set_id": "../../etc/passwd"}, 422),
        ({"dataset": "ds-00000000000000000000", "label_set": {"classes": ["a", "b"]}}, 404),
        ({"dataset": "../x", "label_set": {"classes": ["a", "b"]}}, 422),
        ({"label_set": {"classes": classes}, "dataset": {**inline, "labels": inline["labels"][:-1]}}, 422),
        ({"label_set": {"classes": ["only"]}, "dataset": {"images": inline["images"][:1], "labels": ["only"]}}, 422),
        ({"label_set": {"classes": classes}, "dataset": {"images": ["!!"], "labels": [classes[0]]}}, 422),
    ]
    for payload, status in bad:
        r = client.post("/heads/alignment", json=payload)
        assert r.status_code == status, (payload, r.status_code, r.text)
        assert r.json()["error"]["message"]
