"""The playground page in a real headless Chromium (Debian's, driven by Playwright), against a running service.

One walk through the page, as a person would: upload a world image, classify, read the top label, open the
explanation (hover a head for its description, click it for its spectrum), load the head spectra, fit on a world
task and classify with the new set; then ``/docs`` and ``/redoc``. Every request must stay on the service (no CDN)
and the console must hold no error. The screenshot is checked (the heatmap is drawn, not blank); with
``RESIDUAL_UPDATE_SCREENSHOT=1`` it replaces ``docs/playground.png`` (shown by the README), never otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Page, Request, expect, sync_playwright

from residual.tiny import tasks
from tests.processes import api_server, variant_checkpoint, worker_process
from tests.redis_server import start_private
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TASK = tasks.TASKS["colour"]
KEY = "playground-admin-key-0123456789"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise AssertionError("Chromium is not installed: run `bash scripts/ensure-chromium.sh` (Debian's chromium "
                             "package; .ci/run and scripts/setup.sh call it)")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    redis = start_private()
    artifacts = tmp_path_factory.mktemp("playground-artifacts")
    worker = worker_process(redis.url, artifacts)
    try:
        with api_server(redis.url, artifacts, admin_api_key=KEY) as (client, _):
            client.headers["Authorization"] = f"Bearer {KEY}"
            yield client
    finally:
        worker.kill()
        worker.wait(timeout=30)
        redis.stop()


class Watch:
    """Console errors, page errors and any request that leaves the service."""

    def __init__(self, page: Page, origin: str) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.origin = origin
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("request", self._request)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def _request(self, req: Request) -> None:
        u = urlparse(req.url)
        if u.scheme in ("http", "https", "ws", "wss") and f"{u.scheme}://{u.netloc}" != self.origin:
            self.foreign.append(req.url)


def test_playground_classifies_explains_fits_and_docs_work_offline(service: httpx.Client, tmp_path: Path) -> None:
    origin = str(service.base_url).rstrip("/")
    images, labels, _ = tasks.task_images("colour", "test", n=3)
    files = []
    for i, im in enumerate(images):
        path = tmp_path / f"world-{i}.png"
        Image.fromarray(im).resize((96, 96), Image.NEAREST).save(path)
        files.append(path)
    # a second basis, so the Heads tab can compare two
    r = service.post("/bases", json={"name": "shape-200", "dataset": "world:shape", "max_images": 200})
    assert r.status_code == 202, r.text
    wait_for(lambda: service.get(r.json()["status_url"]).json()["status"] == "succeeded", 300, "the basis build")
    # what the API itself answers for the first image, with the page's default label set (the colour task's)
    expected = service.post("/classify", json={
        "images": [base64.b64encode(files[0].read_bytes()).decode()],
        "label_set": {"classes": list(TASK.classes), "templates": list(TASK.templates)}}).json()
    top = expected["results"][0]["top"][0]["label"]
    assert top == TASK.classes[labels[0]]  # the model gets this world image right

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        watch = Watch(page, origin)
        page.goto(origin + "/")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Tab")  # change event: the lists load with the key
        expect(page.locator("#basis option").nth(1)).to_be_attached()  # the lists loaded with the key

        page.set_input_files("#files", [str(f) for f in files])
        assert page.locator("#thumbs img").count() == 3
        page.get_by_role("button", name="Classify", exact=True).click()
        page.wait_for_selector(".result")
        assert page.locator(".result").count() == 3
        shown = page.locator(".result").first.locator(".bar.top .label").inner_text()
        assert shown == top

        # the explanation of the first image's top label: every head of the grid, summing to the logit
        page.wait_for_selector("#why-body table")
        g = service.get("/heads").json()["geometry"]
        assert page.locator("#why-body button[data-unit]").count() == g["layers"] * g["heads"]
        assert top in page.locator("#why-summary").inner_text()
        head = page.locator('#why-body button[data-unit="L3.H1"]')
        head.hover()
        page.wait_for_selector("#head-info li")
        assert "Head 3.1" in page.locator("#head-info").inner_text()
        head.click()
        spectrum = page.locator("#head-spectrum img")
        expect(spectrum).to_have_attribute("src", re.compile(r"^blob:"))
        wait_for(lambda: spectrum.evaluate("img => img.complete && img.naturalWidth") > 0, 30, "the spectrum PNG")

        # keyboard: focus a head, Enter opens its spectrum; every form control has a label
        other = page.locator('#why-body button[data-unit="L0.H2"]')
        other.focus()
        expect(page.locator("#head-info")).to_contain_text("Head 0.2")
        page.keyboard.press("Enter")
        expect(page.locator("#head-spectrum figcaption")).to_contain_text("head 0.2")
        unlabelled = page.evaluate("() => [...document.querySelectorAll('input, select, textarea')]"
                                   ".filter((e) => !e.labels || !e.labels.length).map((e) => e.id)")
        assert unlabelled == []

        page.get_by_role("button", name="Load head spectra").click()
        page.wait_for_selector("#heads-body table")
        assert page.locator("#heads-body table").count() == 2
        page.locator("#classify").scroll_into_view_if_needed()
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        heatmap = page.locator("#why-body table").bounding_box()
        assert heatmap is not None
        if os.environ.get("RESIDUAL_UPDATE_SCREENSHOT"):  # the README's picture, refreshed on request only
            shutil.copy(shot, ROOT / "docs" / "playground.png")

        # a fit on a world task with live progress, then classify with the new set
        page.get_by_label("World task (or upload below)").select_option("colour")
        page.get_by_label("Training images").fill("200")
        page.get_by_label("Epochs", exact=True).fill("2")
        page.get_by_role("button", name="Start fit").click()
        expect(page.locator("#fit-status")).to_have_text(re.compile(r"^done:"), timeout=240_000)
        status = page.locator("#fit-status").inner_text()
        assert "playground@v-" in status and "activated" in status
        page.get_by_role("button", name="Classify with it").click()
        page.get_by_role("button", name="Classify", exact=True).click()
        expect(page.locator(".result .muted").first).to_contain_text("playground@")
        page.get_by_role("button", name="Roll back").click()  # the first version: nothing to roll back to
        page.wait_for_selector("#error:not([hidden])")
        assert "no version before the active one" in page.locator("#error").inner_text()

        # insights: the label set diagnosed before a fit, two bases compared, the drift of what was classified
        page.get_by_label("World task (or upload below)").select_option("shape")
        page.get_by_role("button", name="Diagnose the label set first").click()
        expect(page.locator("#diagnose-accuracy")).to_contain_text("zero-shot accuracy")
        assert page.locator("#diagnose-pairs li").count() == 5
        page.get_by_role("button", name="Compare bases").click()
        expect(page.locator("#compare-least")).to_contain_text("least similar heads: L")
        expect(page.locator("#compare-body img")).to_have_attribute("src", re.compile(r"^blob:"))
        page.get_by_role("button", name="Load drift").click()
        expect(page.locator("#drift-summary")).to_contain_text(re.compile(r"score \d\.\d{3} over [1-9]\d* images"))
        assert page.locator("#drift-body tr").count() == 9  # the header and the 8 most drifted units

        # an error from the service, shown in words
        page.get_by_label("Classes (one per line)").fill("only\nonly")
        page.get_by_role("button", name="Classify", exact=True).click()
        expect(page.locator("#error")).to_contain_text("duplicate classes")
        watch.errors = [e for e in watch.errors if "status of 422" not in e]  # Chromium logs every 4xx response

        page.goto(origin + "/docs")
        page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
        assert page.locator(".opblock-summary-path", has_text="/classify").count() >= 1
        page.goto(origin + "/redoc")
        page.wait_for_selector("h1", timeout=30_000)
        expect(page.locator("body")).to_contain_text("/fit-alignment", timeout=30_000)
        browser.close()

    assert watch.foreign == [], watch.foreign
    assert watch.errors == [], watch.errors
    # the screenshot shows the page, not a blank frame: the heatmap region holds many colours (one per head value)
    picture = Image.open(shot).convert("RGB")
    assert picture.size[0] == 1360 and picture.size[1] >= 1000
    box = (int(heatmap["x"]), int(heatmap["y"]), int(heatmap["x"] + heatmap["width"]),
           int(heatmap["y"] + heatmap["height"]))
    colours = picture.crop(box).getcolors(maxcolors=1_000_000) or []
    assert len(colours) >= 24, f"{len(colours)} colours in the heatmap: a blank or broken render"


def test_the_model_picker_scopes_every_request_to_the_chosen_model(tmp_path: Path) -> None:
    """Two models: the picker lists both (the default first); choosing the second reloads its lists and classifies
    with it, and the page shows the scores the API gives for that model."""
    redis = start_private()
    variant = variant_checkpoint(tmp_path / "variant.safetensors")
    models = [{"name": "tiny", "architecture": "residual-tiny"},
              {"name": "tiny-b", "architecture": "residual-tiny", "weights": str(variant)}]
    image = tmp_path / "world.png"
    Image.fromarray(tasks.task_images("colour", "test", n=1)[0][0]).save(image)
    shape = tasks.TASKS["shape"]  # a colour image against shape classes: scores far from 1, where models differ
    try:
        with api_server(redis.url, tmp_path / "artifacts", models=json.dumps(models)) as (service, _):
            origin = str(service.base_url).rstrip("/")
            answers = {m: service.post("/classify", json={
                "images": [base64.b64encode(image.read_bytes()).decode()], "model": m, "top_k": 1,
                "label_set": {"classes": list(shape.classes), "templates": list(shape.templates)}}).json()
                for m in ("tiny", "tiny-b")}
            scores = {m: a["results"][0]["top"][0]["score"] for m, a in answers.items()}
            assert f"{100 * scores['tiny']:.1f}" != f"{100 * scores['tiny-b']:.1f}"  # the page tells them apart
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1360, "height": 1000})
                watch = Watch(page, origin)
                page.goto(origin + "/")
                picker = page.get_by_label("model", exact=True)
                expect(picker).to_be_visible()
                assert picker.locator("option").all_inner_texts() == ["tiny (default)", "tiny-b"]
                with page.expect_request(lambda r: "/coefficients?model=tiny-b" in r.url):
                    picker.select_option("tiny-b")
                expect(page.locator("#model")).to_have_text("tiny-b")
                page.set_input_files("#files", [str(image)])
                page.get_by_label("Classes (one per line)").fill("\n".join(shape.classes))
                page.locator("#templates").fill("\n".join(shape.templates))
                with page.expect_response(lambda r: r.url.endswith("/classify")) as answered:
                    page.get_by_role("button", name="Classify", exact=True).click()
                assert answered.value.json()["model"] == "tiny-b"  # the form carried the chosen model
                page.wait_for_selector(".result")
                top = page.locator(".result").first.locator(".bar.top")
                expect(top).to_contain_text(f"{100 * scores['tiny-b']:.1f}")
                browser.close()
            assert watch.foreign == [] and watch.errors == [], (watch.foreign, watch.errors)
    finally:
        redis.stop()
