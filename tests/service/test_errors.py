"""Errors that say what to do (issue 23.7): each common mistake of a new user, and the exact words it gets back.

Also the datasets a newcomer brings (23.6): an archive as a multipart file, a 415 that shows the curl line, a basis
from too few images flagged in its listing.
"""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path

from fastapi.testclient import TestClient

from residual import Basis, init_coefficients
from residual.basis import fit_basis
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from tests.pictures import world_archive
from tests.service.conftest import png_b64

TASK = tasks.TASKS["colour"]


def _message(r) -> str:
    return r.json()["error"]["message"]


def test_an_image_sent_as_text_to_embeddings(client: TestClient) -> None:
    image = "data:image/png;base64," + png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    for value in (image, image.split(",", 1)[1]):  # a data URI, and bare base64 of a PNG
        r = client.post("/v1/embeddings", json={"model": "residual-tiny", "input": ["a red thing", value]})
        assert r.status_code == 422
        assert _message(r) == ('input[1] looks like an image; pass "modality": "image" (with the openai client: '
                               'extra_body={"modality": "image"})')


def test_an_unknown_coefficient_set_lists_the_known_ones(client: TestClient, artifacts: Path) -> None:
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    r = client.post("/classify", json={"images": [image], "coefficients": "pets"})
    assert r.status_code == 404
    before = client.get("/coefficients").json()["coefficient_sets"]
    known = [s["name"] for s in before if s["active"]]
    if not known:
        assert _message(r) == "unknown coefficient set 'pets'; there are none yet (POST /fit-alignment creates one)"
    basis = Basis.load(shipped_basis_path())
    for name in ("cats", "dogs"):
        cs = init_coefficients("coarse", basis, list(TASK.classes), list(TASK.templates))
        cs.save(artifacts / "coefficients" / name / "v1.safetensors")
        (artifacts / "coefficients" / name / "ACTIVE").write_text("v1")
    names = sorted({*known, "cats", "dogs"})
    r = client.post("/classify", json={"images": [image], "coefficients": "pets"})
    assert r.status_code == 404 and _message(r) == f"unknown coefficient set 'pets'; known: {', '.join(names)}"
    r = client.get("/coefficients/pets")
    assert r.status_code == 404 and _message(r) == f"unknown coefficient set 'pets'; known: {', '.join(names)}"


def test_activate_without_a_body_names_the_field(client: TestClient) -> None:
    r = client.post("/coefficients/cats/activate")
    assert r.status_code == 415  # no content type at all
    r = client.post("/coefficients/cats/activate", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert _message(r) == "this route needs a JSON body (Activate; required fields: version)"
    r = client.post("/coefficients/cats/activate", json={})
    assert r.status_code == 422 and _message(r) == "version: Field required"


def test_a_label_set_that_is_not_json_is_415_like_classify(client: TestClient) -> None:
    r = client.post("/label-sets", content=b"classes=cat,dog",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert _message(r) == ("send the body as application/json (a LabelSetRequest); the content type was "
                           "application/x-www-form-urlencoded")
    r = client.post("/classify", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in _message(r)


def test_classes_at_the_top_level_of_classify(client: TestClient) -> None:
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    r = client.post("/classify", json={"images": [image], "classes": ["cat", "dog"]})
    assert r.status_code == 422
    assert _message(r) == ('unknown field \'classes\'; put classes inside label_set: {"label_set": {"classes": [...], '
                           '"templates": [...]}}')
    r = client.post("/classify", json={"images": [image], "label_set": {"classes": ["a"]}, "topk": 3})
    assert _message(r) == ("unknown field 'topk'; the fields are coefficients, explain, images, label_set, "
                           "label_set_id, model, scores, top_k")


def test_numbers_follow_json_and_json_schema(client: TestClient) -> None:
    """3.0 is the integer 3 (JSON has one number type; the schema's "integer" admits it); "3", true and 3.5 are
    not integers, and null is "not given" for every optional field, the label set among them."""
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    body = {"images": [image], "label_set": {"classes": list(TASK.classes)}}
    r = client.post("/classify", json={**body, "top_k": 2.0, "explain": 3.0})
    assert r.status_code == 200, r.text
    assert [len(res["top"]) for res in r.json()["results"]] == [2]
    assert len(r.json()["results"][0]["top"][0]["contributions"]) == 3
    for field, value in (("top_k", "2"), ("top_k", True), ("explain", 2.5)):
        r = client.post("/classify", json={**body, field: value})
        assert r.status_code == 422 and _message(r).startswith(f"{field}: Input should be a valid integer"), r.text
    r = client.post("/classify", json={"images": [image], "label_set": None})
    assert r.status_code == 422
    assert _message(r) == "give label_set, label_set_id, or coefficients (whose label set is then used)"
    r = client.post("/classify", json={**body, "label_set_id": None, "coefficients": None})
    assert r.status_code == 200, r.text


def test_a_label_set_inline_and_by_id_is_refused(client: TestClient) -> None:
    image = tasks.task_images("colour", "test", n=1)[0][0]
    labels = {"classes": list(TASK.classes)}
    label_set_id = client.post("/label-sets", json=labels).json()["label_set_id"]
    r = client.post("/classify", json={"images": [png_b64(image)], "label_set": labels, "label_set_id": label_set_id})
    assert r.status_code == 422 and _message(r) == "give label_set or label_set_id, not both"
    png = base64.b64decode(png_b64(image))
    r = client.post("/classify", files=[("images", ("a.png", png, "image/png"))],
                    data={"label_set": json.dumps(labels), "label_set_id": label_set_id})
    assert r.status_code == 422 and _message(r) == "give label_set or label_set_id, not both"
    r = client.post("/classify", json={"images": [png_b64(image)], "label_set": None, "label_set_id": label_set_id})
    assert r.status_code == 200, r.text


def test_a_method_a_path_does_not_take_is_405_with_allow(client: TestClient) -> None:
    for method, path, allow in (("DELETE", "/classify", "POST"),
                                ("PUT", "/fit-alignment/0f8e2a8c-4d7e", "DELETE, GET"),  # status and cancel
                                ("DELETE", "/heads/alignment/0f8e2a8c-4d7e.png", "GET"),  # a picture, not a job
                                ("POST", "/heads/2/1", "GET")):
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.status_code, r.text)
        assert r.headers["allow"] == allow, (method, path)
        assert r.json()["error"]["type"] == "method_not_allowed", r.text


def test_any_job_id_in_a_path_is_a_4xx(client: TestClient) -> None:
    """Non-ASCII and percent-encoded bytes (a 500 before), a '.png' that is not a picture route's, a well-formed
    unknown id."""
    pattern = "path.job_id: String should match pattern '^[A-Za-z0-9-]{1,64}$'"
    for path, status, message in (("/fit-alignment/%C3%BFZ", 422, pattern),
                                  ("/bases/jobs/%FF%FE", 422, pattern),
                                  ("/heads/alignment/a%00b", 422, pattern),
                                  ("/fit-alignment/x.png", 404, "Not Found"),
                                  ("/fit-alignment/0f8e2a8c-4d7e", 404, "unknown job 0f8e2a8c-4d7e")):
        r = client.get(path)
        assert (r.status_code, _message(r)) == (status, message), (path, r.text)


def test_a_dataset_that_is_not_an_id_mentions_world_tasks(client: TestClient) -> None:
    r = client.post("/fit-alignment", json={"name": "x", "dataset": "my-pets"})
    assert r.status_code == 422
    assert _message(r) == ("dataset 'my-pets' is neither a dataset id ('ds-' and 20 hex digits, from POST /datasets) "
                           "nor a world task (world:background, world:colour, world:count, world:digit, "
                           "world:position, world:shape, world:size, world:texture)")
    r = client.post("/bases", json={"name": "b", "dataset": "world:cats"})
    assert r.status_code == 422 and _message(r).endswith("world:texture or world:mixture")


def test_base64_with_line_breaks_is_accepted(client: TestClient) -> None:
    """MIME tools wrap base64 at 76 columns; the service ignores the whitespace (same scores as unwrapped)."""
    images = tasks.task_images("colour", "test", n=2)[0]
    plain = [png_b64(a) for a in images]
    wrapped = ["\n".join(textwrap.wrap(p, 76)) + "\n" for p in plain]
    spaced = [" ".join(textwrap.wrap(p, 64)) for p in plain]
    label_set = {"classes": list(TASK.classes), "templates": list(TASK.templates)}
    answers = [client.post("/classify", json={"images": imgs, "label_set": label_set, "top_k": 3})
               for imgs in (plain, wrapped, ["data:image/png;base64," + w for w in wrapped], spaced)]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert all(a.json()["results"] == answers[0].json()["results"] for a in answers)
    r = client.post("/classify", json={"images": ["not base64 at all!"], "label_set": label_set})
    assert r.status_code == 422 and _message(r).startswith("images[0] is not valid base64 or a base64 data URI")


def test_datasets_take_a_multipart_file_or_say_how_to_upload(client: TestClient) -> None:
    archive = world_archive("colour", 21)
    raw = client.post("/datasets", content=archive, headers={"content-type": "application/x-tar"})
    assert raw.status_code == 201, raw.text
    multipart = client.post("/datasets", files={"file": ("pets.tar", archive, "application/x-tar")})
    assert multipart.status_code == 201, multipart.text
    assert multipart.json() == raw.json()  # the same content, the same dataset
    r = client.post("/datasets", content=archive, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert "curl --data-binary @pets.tar -H 'content-type: application/x-tar' <server>/datasets" in _message(r)
    assert "curl -F file=@pets.tar <server>/datasets" in _message(r)
    r = client.post("/datasets", files={"a": ("a.tar", archive), "b": ("b.tar", archive)})
    assert r.status_code == 422 and _message(r).startswith("a multipart upload holds exactly one file part")


def test_a_basis_from_too_few_images_is_flagged(client: TestClient, artifacts: Path) -> None:
    bb = client.app.state.runtime.ready.model.backbone
    images, _, _ = tasks.task_images("shape", "train", n=200)
    small = fit_basis(bb, [bb.pixels_from_arrays(images)], name="few-images", source={"kind": "images", "n": 200})
    small.save(artifacts / "bases" / "few.safetensors")
    listing = {b["name"]: b for b in client.get("/bases").json()["bases"]}
    d = bb.geometry.out_dim
    assert listing["few-images"]["warnings"] == [
        f"built from 200 images, under 10 per component it keeps (up to {d} per unit): its spectra and the fits "
        f"built on it are unreliable; build it from {10 * d} images or more"]
    assert listing["residual-tiny-reference"]["warnings"] == []  # 10,000 images
