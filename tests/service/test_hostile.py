"""Hostile input and configuration (reliability.md A3, A5, A6, C2, F2): bombs, animations, injected ids, NaN
coefficient files, secrets, and a queue Redis that may evict jobs. Everything against the real model."""

from __future__ import annotations

import base64
import io
import logging
import socket
import struct
import warnings
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from residual import Basis, init_coefficients
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.api.app import create_app
from tests.redis_server import free_port, start_private
from tests.service.conftest import make_settings, png_b64, wait_ready


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A single-colour 8-bit grayscale PNG of side x side pixels, written row by row with zlib level 9."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs() -> dict[int, bytes]:
    return {side: bomb_png(side) for side in (20_000, 12_000)}


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


LABELS = {"classes": list(tasks.TASKS["colour"].classes), "templates": list(tasks.TASKS["colour"].templates)}


def test_decompression_bombs_are_stopped_by_our_pixel_ceiling(client: TestClient, bombs: dict[int, bytes]) -> None:
    for side, blob in bombs.items():
        assert len(blob) < 2_000_000  # the byte limit alone would let it through
        r = client.post("/classify", json={"images": [_b64(blob)], "label_set": LABELS})
        assert r.status_code == 413, (side, r.text)
        assert r.json()["error"]["type"] == "payload_too_large" and "pixels" in r.json()["error"]["message"]
    # Pillow alone refuses the 20000^2 bomb at open() but only warns about the 12000^2 one: our ceiling (40 Mpx,
    # named in the answer) is what stops it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bombs[20_000]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(bombs[12_000])).close()
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    r = client.post("/classify", json={"images": [_b64(bombs[12_000])], "label_set": LABELS})
    assert "the limit is 40000000" in r.json()["error"]["message"]
    good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    assert client.post("/classify", json={"images": [good], "label_set": LABELS}).status_code == 200


def test_animated_images_use_the_first_frame(client: TestClient) -> None:
    first, other = Image.new("RGB", (48, 48), (220, 30, 30)), Image.new("RGB", (48, 48), (40, 80, 230))
    for fmt in ("PNG", "GIF", "WEBP"):
        buf = io.BytesIO()
        frames = 10_000 if fmt == "PNG" else 300
        rest = [other if i % 2 == 0 else first for i in range(frames - 1)]  # alternate: equal neighbours merge
        first.save(buf, fmt, save_all=True, append_images=rest, duration=10, lossless=True)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            assert getattr(im, "n_frames", 1) == frames  # really animated
        alone = io.BytesIO()
        first.save(alone, fmt, lossless=True)
        r = client.post("/classify", json={"images": [_b64(buf.getvalue()), _b64(alone.getvalue())],
                                           "label_set": LABELS, "top_k": 7})
        assert r.status_code == 200, (fmt, r.text)
        animated, single = r.json()["results"]
        assert animated["top"] == single["top"], fmt


def test_foreign_formats_behind_a_png_name_answer_415(client: TestClient) -> None:
    arr = tasks.task_images("colour", "test", n=1)[0][0]
    for fmt in ("TIFF", "BMP", "ICO", "PDF", "PPM", "TGA"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        r = client.post("/classify", files=[("images", ("x.png", buf.getvalue(), "image/png"))],
                        data={"label_set": '{"classes": ["a", "b"]}'})
        assert r.status_code == 415, (fmt, r.text)


class _NetworkGuard:
    """Records every socket connection that is not to the loopback interface."""

    def __init__(self) -> None:
        self.outbound: list[object] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = socket.socket.connect

        def connect(sock: socket.socket, address: object) -> object:
            host = address[0] if isinstance(address, tuple) else address
            if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
                self.outbound.append(address)
                raise OSError("network access blocked by the test")
            return real(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


INJECTED = ["../../etc/passwd", "hf-hub:attacker/x", "local-dir:/", " ", "a\nb", "http://169.254.169.254/", "..",
            "/etc/passwd", "ds-../../x", "ls-" + "0" * 19 + "/"]


class _DiskGuard:
    """Records every file-system access (open, stat, listing) under the artifact store."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.touched: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import builtins
        import os

        def wrap(fn):  # type: ignore[no-untyped-def]
            def guarded(path, *args, **kwargs):  # type: ignore[no-untyped-def]
                p = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
                if p.startswith(self.root) or "passwd" in p:
                    self.touched.append(p)
                return fn(path, *args, **kwargs)

            return guarded

        for module, name in ((os, "stat"), (os, "open"), (os, "scandir"), (os, "listdir"), (io, "open"),
                             (builtins, "open")):
            monkeypatch.setattr(module, name, wrap(getattr(module, name)))


def test_injected_identifiers_are_refused_without_touching_disk_or_network(client: TestClient, artifacts: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    guard, disk = _NetworkGuard(), _DiskGuard(artifacts)
    guard.install(monkeypatch)
    disk.install(monkeypatch)
    for ident in INJECTED:
        calls = [
            ("POST", "/classify", {"images": [good], "coefficients": ident}, "coefficients"),
            ("POST", "/classify", {"images": [good], "label_set_id": ident}, "not a label-set id"),
            ("POST", "/heads/alignment", {"dataset": ident, "label_set": {"classes": ["a", "b"]}}, "dataset id"),
            ("POST", "/fit-alignment", {"name": ident, "dataset": "world:colour"}, "must match"),
            ("POST", "/fit-alignment", {"name": "ok", "dataset": ident, "label_set": {"classes": ["a", "b"]}},
             "dataset id"),
        ]
        for method, path, body, fragment in calls:
            r = client.request(method, path, json=body)
            assert r.status_code == 422, (path, ident, r.status_code, r.text)
            assert fragment in r.json()["error"]["message"], (path, ident, r.text)
        q = quote(ident, safe="").replace(".", "%2E")  # so the client does not resolve '..' itself
        # an id with an inner '/' matches no route (404); a trailing '/' is only redirected (307, nothing read);
        # any other id reaches its route and is refused there (422)
        expected = 404 if "/" in ident.rstrip("/") else 307 if ident.endswith("/") else 422
        for path in (f"/coefficients/{q}", f"/fit-alignment/{q}", f"/datasets/{q}", f"/label-sets/{q}",
                     f"/heads/alignment/{q}"):
            r = client.get(path, follow_redirects=False)
            assert r.status_code == expected, (path, r.status_code, r.text)
            if expected != 307:
                assert r.json()["error"]["type"] == ("not_found" if expected == 404 else "invalid_request")
    assert guard.outbound == []
    assert disk.touched == [], disk.touched[:5]


def test_a_coefficient_file_with_nan_is_refused_and_the_active_version_stays(client: TestClient,
                                                                             artifacts: Path) -> None:
    basis = Basis.load(shipped_basis_path())
    cs = init_coefficients("full", basis, LABELS["classes"], LABELS["templates"])
    folder = artifacts / "coefficients" / "guarded"
    cs.save(folder / "v-good.safetensors")
    (folder / "ACTIVE").write_text("v-good")
    with safe_open(str(folder / "v-good.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no items()
        meta = fh.metadata()
    tensors["lambdas"] = tensors["lambdas"].clone()
    tensors["lambdas"].view(-1)[3] = float("nan")
    save_file(tensors, str(folder / "v-nan.safetensors"), metadata=meta)
    good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    r = client.post("/classify", json={"images": [good], "coefficients": "guarded@v-nan"})
    assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]
    r = client.post("/coefficients/guarded/activate", json={"version": "v-nan"})
    assert r.status_code == 422
    assert (folder / "ACTIVE").read_text() == "v-good"
    r = client.post("/classify", json={"images": [good], "coefficients": "guarded"})
    assert r.status_code == 200 and r.json()["coefficients"] == "guarded@v-good"
    assert np.isfinite([t["score"] for t in r.json()["results"][0]["top"]]).all()


SECRETS = ("sk-api-7f3a9c0d4e5b6a71", "sk-admin-41d2e8f9a0b1c2d3", "hunter2-redis-pw")


def test_secrets_never_reach_logs_bodies_or_repr(artifacts: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    closed = free_port()  # nothing listens: Redis is "down", which logs warnings
    settings = make_settings(artifacts, f"redis://:{SECRETS[2]}@127.0.0.1:{closed}/0", api_key=SECRETS[0],
                             admin_api_key=SECRETS[1], redis_retry_s=0.05)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        bodies = [c.get("/readyz").text, c.post("/classify", json={}).text,
                  c.post("/classify", json={}, headers={"Authorization": "Bearer wrong"}).text,
                  c.post("/label-sets", json={"classes": ["a"]},
                         headers={"Authorization": f"Bearer {SECRETS[0]}"}).text,
                  c.post("/fit-alignment", json={"name": "x", "dataset": "world:colour"},
                         headers={"Authorization": f"Bearer {SECRETS[1]}"}).text]
        label_sets = c.app.state.runtime.ready.label_sets

        def explode(ident: str) -> tuple[list[str], list[str]]:
            raise RuntimeError(f"boom at /srv/secret/path with {torch.ones(2)} and {SECRETS[2]}")

        monkeypatch.setattr(label_sets, "get", explode)
        r = c.get("/label-sets/ls-" + "0" * 20, headers={"Authorization": f"Bearer {SECRETS[0]}"})
        assert r.status_code == 500
        assert r.json() == {"error": {"type": "internal", "message": "internal server error"}}
        bodies.append(r.text)
        text = "\n".join(bodies) + repr(settings) + str(settings) + repr(c.app.state.runtime.settings)
    logs = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "redis" in logs.lower()  # the outage was logged ...
    for secret in SECRETS[:2]:
        assert secret not in text and secret not in logs
    assert SECRETS[2] not in "\n".join(bodies[:-1]) + repr(settings) + logs  # ... without the password
    assert "/srv/secret/path" not in bodies[-1] and "tensor(" not in bodies[-1]


def test_a_queue_redis_that_may_evict_jobs_is_reported(artifacts: Path, caplog: pytest.LogCaptureFixture) -> None:
    lru = start_private(None, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    try:
        caplog.set_level(logging.WARNING)
        with TestClient(create_app(make_settings(artifacts, lru.url))) as c:
            wait_ready(c)
            body = c.get("/readyz").json()
        assert body["queue_maxmemory_policy"] == "allkeys-lru"
        assert body["warnings"] and "noeviction" in body["warnings"][0]
        assert any("allkeys-lru" in rec.getMessage() for rec in caplog.records)
    finally:
        lru.stop()
    safe = start_private(None, "--maxmemory-policy", "noeviction")
    try:
        with TestClient(create_app(make_settings(artifacts, safe.url))) as c:
            wait_ready(c)
            body = c.get("/readyz").json()
        assert body["queue_maxmemory_policy"] == "noeviction" and body["warnings"] == []
    finally:
        safe.stop()


def _zip_bomb(member_bytes: int) -> bytes:
    """A zip holding one member of ``member_bytes`` zeros (about 1/1000 of that compressed)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf, \
            zf.open("red/bomb.png", "w", force_zip64=True) as f:
        chunk = b"\0" * (16 << 20)
        for _ in range(member_bytes // len(chunk)):
            f.write(chunk)
    return buf.getvalue()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_archive_bombs_are_refused_while_streaming(client: TestClient, artifacts: Path) -> None:
    """A 1.5 MB zip with one 1.5 GB member: 413 before inflating it, with under 100 MB of RSS growth."""
    bomb = _zip_bomb(1536 << 20)
    assert len(bomb) < 2_000_000
    before = _rss_mib()
    r = client.post("/datasets", content=bomb, headers={"content-type": "application/zip"})
    grown = _rss_mib() - before
    assert r.status_code == 413, r.text
    assert "per member" in r.json()["error"]["message"]
    assert grown < 100, f"RSS grew by {grown:.0f} MiB"
    # a tar.gz whose member header claims 1.5 GB is refused before its data is read
    import gzip
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("red/big.png")
        info.size = 1536 << 20
        tf.addfile(info)  # the header alone: its data is never written
    r = client.post("/datasets", content=gzip.compress(raw.getvalue()), headers={"content-type": "application/gzip"})
    assert r.status_code == 413 and "per member" in r.json()["error"]["message"], r.text
    assert not list((artifacts / "datasets").glob("*")) or all(
        p.name.startswith("ds-") for p in (artifacts / "datasets").iterdir())  # nothing half-written


def test_archive_member_count_and_total_limits(artifacts: Path, redis_server) -> None:
    import tarfile

    png = io.BytesIO()
    Image.fromarray(tasks.task_images("colour", "test", n=1)[0][0]).save(png, "PNG")

    def tar(n: int, copies: int = 1) -> bytes:
        """n members alternating two classes, each the PNG repeated ``copies`` times."""
        buf = io.BytesIO()
        data = png.getvalue() * copies
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(n):
                info = tarfile.TarInfo(f"{'red' if i % 2 else 'blue'}/{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    settings = make_settings(artifacts, redis_server.url, max_archive_members=3,
                             max_archive_bytes=int(5.5 * len(png.getvalue())))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        r = c.post("/datasets", content=tar(4), headers={"content-type": "application/x-tar"})
        assert r.status_code == 413 and "more than 3 members" in r.json()["error"]["message"], r.text
        r = c.post("/datasets", content=tar(3, copies=2), headers={"content-type": "application/x-tar"})
        assert r.status_code == 413 and "inflates to more than" in r.json()["error"]["message"], r.text
        r = c.post("/datasets", content=tar(3), headers={"content-type": "application/x-tar"})
        assert r.status_code == 201, r.text


def test_a_corrupt_coefficient_file_is_listed_with_an_error_not_a_500(client: TestClient, artifacts: Path) -> None:
    basis = Basis.load(shipped_basis_path())
    cs = init_coefficients("coarse", basis, LABELS["classes"], LABELS["templates"])
    folder = artifacts / "coefficients" / "half-written"
    cs.save(folder / "v-ok.safetensors")
    (folder / "v-torn.safetensors").write_bytes((folder / "v-ok.safetensors").read_bytes()[:40])  # cut short
    (folder / "ACTIVE").write_text("v-ok")
    listing = client.get("/coefficients")
    assert listing.status_code == 200, listing.text
    entry = next(e for e in listing.json()["coefficient_sets"] if e["name"] == "half-written")
    assert sorted(entry["versions"]) == ["v-ok", "v-torn"]
    detail = client.get("/coefficients/half-written").json()
    torn = next(v for v in detail["versions"] if v["version"] == "v-torn")
    assert "unreadable" in torn["error"] and torn["active"] is False
    r = client.post("/coefficients/half-written/activate", json={"version": "v-torn"})
    assert r.status_code == 422 and client.get("/coefficients/half-written").json()["active"] == "v-ok"
