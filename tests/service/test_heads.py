"""The head-spectrum API against the real embedded model: numbers equal the library's, errors are 4xx."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from residual import Basis, LinearisedLN, class_embeddings, decompose, load_backbone
from residual.dictionary import load_dictionary
from residual.heads import head_alignment
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.stores.bases import basis_id
from tests.pictures import assert_picture
from tests.service.conftest import png_b64


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
    cases = (("/heads/6/0", 404, "no head (6, 0); the model has 6 layers x 4 heads"),
             ("/heads/0/4", 404, "no head (0, 4); the model has 6 layers x 4 heads"),
             ("/heads/6/0/spectrum.png", 404, "no head (6, 0); the model has 6 layers x 4 heads"),
             ("/heads/-1/0", 422, "path.layer: Input should be greater than or equal to 0"),
             ("/heads/x/0", 422, "path.layer: Input should be a valid integer, unable to parse string as an integer"),
             ("/heads/0/0?method=magic", 422, "query.method: Input should be 'somp' or 'textspan'"),
             ("/heads/spectrum.png?value=nope", 422, "query.value: Input should be 'k_90', 'k_99', "
                                                     "'participation_ratio', 'twonn' or 'evr_1'"),
             ("/heads/alignment/not-a-job", 404, "unknown job not-a-job"),
             ("/heads/alignment/%C3%BFZ", 422, "path.job_id: String should match pattern '^[A-Za-z0-9-]{1,64}$'"))
    for path, status, message in cases:
        r = client.get(path)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.json()["error"]["message"] == message, path


def test_pictures(client: TestClient) -> None:
    """Every picture decodes and draws something (many colours), and a picture depends on what it shows."""
    pictures = {}
    for path in ("/heads/spectrum.png", "/heads/spectrum.png?value=participation_ratio", "/heads/3/1/spectrum.png"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", path
        pictures[path] = assert_picture(r.content)
    assert pictures["/heads/spectrum.png"].tobytes() != pictures[
        "/heads/spectrum.png?value=participation_ratio"].tobytes()  # another value, another picture
    body = {"dataset": "world:colour", "world_sizes": {"score": 60, "eval": 60}}
    for picture in ("heatmap", "ablation"):
        r = client.post(f"/heads/alignment.png?picture={picture}", json=body)
        assert r.status_code == 200, r.text
        assert_picture(r.content)


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
    tasks_list = ", ".join(f"world:{t}" for t in sorted(tasks.TASKS))
    bad = [
        ({"dataset": "world:nope"}, 422, f"unknown world task 'nope'; choose from {tasks_list}"),
        ({"dataset": "world:colour", "label_set": {"classes": ["a", "b"]}}, 422,
         f"world task 'colour' has {len(tasks.TASKS['colour'].classes)} classes; the label set has 2"),
        ({"dataset": "world:colour", "fractions": [0.0]}, 422, "fractions.0: Input should be greater than 0"),
        ({"dataset": "world:colour", "fractions": [0.5, 1.5]}, 422,
         "fractions.1: Input should be less than or equal to 1"),
        ({"dataset": "world:colour", "label_set_id": "../../etc/passwd"}, 422,
         "label_set_id '../../etc/passwd' is not a label-set id (ls- followed by 20 hex digits)"),
        ({"dataset": "ds-00000000000000000000", "label_set": {"classes": ["a", "b"]}}, 404,
         "unknown dataset ds-00000000000000000000"),
        ({"dataset": "../x", "label_set": {"classes": ["a", "b"]}}, 422,
         f"dataset '../x' is neither a dataset id ('ds-' and 20 hex digits, from POST /datasets) nor a world task "
         f"({tasks_list})"),
        ({"label_set": {"classes": classes}, "dataset": {**inline, "labels": inline["labels"][:-1]}}, 422,
         "40 images but 39 labels"),
        ({"label_set": {"classes": ["only"]}, "dataset": {"images": inline["images"][:2], "labels": ["only"] * 2}},
         422, "head alignment needs at least two classes"),
        ({"label_set": {"classes": classes}, "dataset": {"images": ["!!", "!!"], "labels": classes[:2]}}, 422,
         "dataset.images[0] is not valid base64 or a base64 data URI"),
    ]
    for payload, status, message in bad:
        r = client.post("/heads/alignment", json=payload)
        assert r.status_code == status, (payload, r.status_code, r.text)
        assert r.json()["error"]["message"] == message, payload
