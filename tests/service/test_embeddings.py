"""OpenAI-shaped embeddings: equal to an independent open_clip computation, adapted by a coefficient set on request,
base64 or floats, and usable with the official ``openai`` client."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from residual import Basis, decompose, init_coefficients, resolve
from residual.backbone import EMBEDDED_MODELS
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from tests.service.conftest import png_b64

TEXTS = ["a red circle", "a photo of a blue square on the left", "three green stars"]


@pytest.fixture(scope="module")
def reference_model() -> tuple[torch.nn.Module, object, object]:
    """residual-tiny straight from open_clip's factory (no code of ours on the forward path)."""
    open_clip.add_model_config(Path(__file__).resolve().parents[2] / "residual" / "model_configs")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "residual-tiny", pretrained=str(EMBEDDED_MODELS["residual-tiny"]), weights_only=True)
    return model.eval(), preprocess, open_clip.get_tokenizer("residual-tiny")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def test_text_and_image_embeddings_equal_open_clip(client: TestClient, reference_model) -> None:
    model, preprocess, tokenizer = reference_model
    r = client.post("/v1/embeddings", json={"model": "residual-tiny", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "residual-tiny"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    ours = torch.tensor([d["embedding"] for d in body["data"]])
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokenizer(TEXTS)).float(), dim=-1)
    assert float(_cos(ours, ref).min()) >= 0.9999 and torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == int((tokenizer(TEXTS) != 0).sum()) == body["usage"]["total_tokens"]

    images = tasks.task_images("shape", "test", n=4)[0]
    r = client.post("/v1/embeddings", json={"model": "residual-tiny", "modality": "image",
                                            "input": [f"data:image/png;base64,{png_b64(a)}" for a in images]})
    assert r.status_code == 200, r.text
    ours = torch.tensor([d["embedding"] for d in r.json()["data"]])
    with torch.no_grad():
        ref = F.normalize(model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images])), dim=-1)
    assert float(_cos(ours, ref).min()) >= 0.9999
    assert r.json()["usage"]["prompt_tokens"] == 0


def test_a_coefficient_set_adapts_image_embeddings(client: TestClient, artifacts: Path) -> None:
    basis = Basis.load(shipped_basis_path())
    gen = torch.Generator().manual_seed(4)
    t = tasks.TASKS["shape"]
    cs = init_coefficients("full", basis, list(t.classes), list(t.templates), init="randn", generator=gen)
    cs.save(artifacts / "coefficients" / "emb-set" / "v1.safetensors")
    (artifacts / "coefficients" / "emb-set" / "ACTIVE").write_text("v1")
    images = tasks.task_images("shape", "test", n=3)[0]
    body = {"model": "residual-tiny:emb-set", "modality": "image", "input": [png_b64(a) for a in images],
            "encoding_format": "base64"}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "residual-tiny:emb-set@v1"
    adapted = torch.from_numpy(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                                         for d in r.json()["data"]]).copy())
    model = client.app.state.runtime.ready.model
    bb = model.backbone
    pixels = bb.pixels_from_arrays(images)
    expected = F.normalize(resolve(cs, basis).apply(decompose(bb, pixels, model.ln).units), dim=-1)  # unfused
    assert float(_cos(adapted, expected).min()) >= 0.9999
    plain = client.post("/v1/embeddings", json={**body, "model": "residual-tiny", "encoding_format": "float"}).json()
    plain_t = torch.tensor([d["embedding"] for d in plain["data"]])
    assert float(_cos(adapted, plain_t).max()) < 0.999  # the set really changes the embedding
    texts_plain = client.post("/v1/embeddings", json={"model": "residual-tiny", "input": TEXTS}).json()
    texts_set = client.post("/v1/embeddings", json={"model": "residual-tiny:emb-set", "input": TEXTS}).json()
    assert [d["embedding"] for d in texts_plain["data"]] == [d["embedding"] for d in texts_set["data"]]  # image-side

    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and ids[0] == "residual-tiny" and "residual-tiny:emb-set" in ids


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "gpt-4", "input": "x"}, 404, "not served"),
    ({"model": "residual-tiny:no-such-set", "input": "x"}, 404, "unknown coefficient set"),
    ({"model": "residual-tiny", "input": []}, 422, "empty"),
    ({"model": "residual-tiny", "input": "x", "dimensions": 64}, 422, "dimensions"),
    ({"model": "residual-tiny", "input": ["ok", "bad\x00"]}, 422, "input[1]"),
    ({"model": "residual-tiny", "input": ["!!!"], "modality": "image"}, 422, "base64"),
    ({"model": "residual-tiny", "input": [base64.b64encode(b"not an image").decode()], "modality": "image"}, 415,
     "decodable"),
])
def test_bad_embedding_requests(client: TestClient, body: dict, status: int, fragment: str) -> None:
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_the_official_openai_client_works(client: TestClient) -> None:
    import openai  # the dev extra installs it (scripts/setup.sh)

    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused-here-0123456789", http_client=client)
    out = oai.embeddings.create(model="residual-tiny", input=TEXTS)  # the client asks for base64 and decodes it
    ours = client.post("/v1/embeddings", json={"model": "residual-tiny", "input": TEXTS}).json()
    assert len(out.data) == 3 and out.model == "residual-tiny"
    for got, want in zip(out.data, ours["data"], strict=True):
        assert np.allclose(got.embedding, want["embedding"], atol=1e-6)
    buf = io.BytesIO()
    Image.fromarray(tasks.task_images("colour", "test", n=1)[0][0]).save(buf, "PNG")
    img = oai.embeddings.create(model="residual-tiny", input=[base64.b64encode(buf.getvalue()).decode()],
                                extra_body={"modality": "image"})
    assert len(img.data[0].embedding) == client.app.state.runtime.ready.model.backbone.geometry.out_dim
    assert [m.id for m in oai.models.list()][0] == "residual-tiny"
