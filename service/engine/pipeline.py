"""Encoded images -> one preprocessed pixel batch, in parallel, the way open_clip's eval transform would.

Two implementations behind one interface (:class:`ImagePipeline`), chosen by the ``image_pipeline`` setting:

- ``pil`` (the default on CPU): every image is decoded with Pillow (format allowlist, pixel ceiling, first frame:
  :func:`service.images.decode_image`) and preprocessed by open_clip's own transform, so the pixels are exactly
  the library's (bit for bit, tested). A request's images are split into one chunk per decode thread (a pool sized
  to the cores), never decoded one after another on one thread, never on the event loop. Images already at the
  model's input size skip the PIL transform (batched normalisation; identical pixels).
- ``tensor`` (the default on CUDA): JPEGs are decoded in one batched call (``torchvision.io.decode_jpeg`` on the
  model's device: nvJPEG on CUDA), every other format (and what nvJPEG refuses: progressive or CMYK JPEG, data
  without an end-of-image marker) is decoded by Pillow; resize (shortest side, bicubic with antialias), centre crop
  and normalisation run as tensor ops on the device, on a side stream on CUDA. Pixels differ from ``pil`` by at most
  a few levels of 255 (JPEG decoders and the resize kernel round differently; the test states the bound).

Every image of a request is checked by Pillow's header-only open first (:func:`service.images.probe`), before any
is decoded: limits and error answers (413, 415) are the same in both, a request whose images hold more than
``max_request_pixels`` in total is refused with 413 at once, and a bad image fails its request only, never the
batch of other requests.

Memory: each decode thread decodes, resizes and releases one image at a time, under a per-process
:class:`service.images.PixelBudget` (``max_decoding_pixels``), so what decoders hold is bounded whatever the
requests; large JPEGs decode in draft mode; after a request with many decoded pixels, freed memory goes back to the
OS (:func:`service.memory.trim`).
"""

from __future__ import annotations

import asyncio
import io
import os
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image

from residual import Backbone
from residual.backbone import resize_crop
from service import memory
from service.engine.pools import Pool
from service.errors import PayloadTooLarge
from service.images import ALLOWED_FORMATS, ImageHeader, PixelBudget, decode_image, probe

__all__ = ["ImagePipeline", "decode_threads"]

_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"


def decode_threads(setting: int) -> int:
    """Threads of the decode pool: the setting, or the cores this process may use."""
    if setting > 0:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_TRIM_AFTER_PIXELS = 16_000_000  # a request that decoded this many pixels hands freed memory back afterwards


class ImagePipeline:
    def __init__(self, bb: Backbone, pool: Pool, threads: int, max_pixels: int,
                 kind: Literal["auto", "pil", "tensor"] = "auto", max_request_pixels: int = 100_000_000,
                 budget: PixelBudget | None = None) -> None:
        self.bb = bb
        self.pool = pool
        self.threads = threads
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.budget = budget or PixelBudget(4 * max_pixels)
        self.size = bb.geometry.image_size
        cfg = bb.visual.preprocess_cfg
        self.device = bb.device
        tensor_ok = (cfg.get("resize_mode", "shortest") == "shortest" and cfg.get("interpolation", "bicubic") in
                     ("bicubic", "bilinear"))
        if kind == "auto":
            kind = "tensor" if self.device.type == "cuda" and tensor_ok else "pil"
        if kind == "tensor" and not tensor_ok:
            raise ValueError(f"the tensor image pipeline supports resize_mode 'shortest' with bicubic or bilinear "
                             f"interpolation; this model's transform is {cfg}")
        self.kind = kind
        self._interpolation = cfg.get("interpolation", "bicubic")
        self._mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device)[None, :, None, None]
        self._std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device)[None, :, None, None]
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and kind == "tensor" else None

    async def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        """(n,) encoded images -> (n, 3, S, S) float32 pixels (on the model's device for ``tensor``)."""
        chunks = _split(len(blobs), self.threads)
        headers = await asyncio.gather(*(self.pool.run(self._probe, blobs[a:b], a) for a, b in chunks))
        total = sum(h.pixels for part in headers for h in part)
        if total > self.max_request_pixels:
            raise PayloadTooLarge(f"the request's {len(blobs)} images hold {total} pixels in all; the limit per "
                                  f"request is {self.max_request_pixels} (send fewer or smaller images)")
        work = self._pil_chunk if self.kind == "pil" else self._tensor_chunk
        parts = await asyncio.gather(*(self.pool.run(work, blobs[a:b], a, h)
                                       for (a, b), h in zip(chunks, headers, strict=True)))
        if total >= _TRIM_AFTER_PIXELS:
            self.pool.submit(memory.trim)  # freed decode buffers back to the OS (rate-limited; not awaited)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _probe(self, blobs: list[bytes], offset: int) -> list[ImageHeader]:
        return [probe(blob, self.max_pixels, offset + i) for i, blob in enumerate(blobs)]

    # ---- pil ---------------------------------------------------------------------------------------------------
    def _pil_chunk(self, blobs: list[bytes], offset: int, headers: list[ImageHeader]) -> torch.Tensor:
        """One image at a time: decode (draft mode for large JPEGs), preprocess, release."""
        out = []
        for i, (blob, header) in enumerate(zip(blobs, headers, strict=True)):
            with self.budget.hold(header.pixels):
                im = decode_image(blob, self.max_pixels, offset + i, draft_to=self.size)
                if im.size == (self.size, self.size):  # already the input size: normalise only (identical pixels)
                    out.append(self.bb.pixels_from_arrays(np.array(im)[None])[0])
                else:
                    out.append(self.bb.preprocess(im))
                im.close()
                del im
        return torch.stack(out)

    # ---- tensor ------------------------------------------------------------------------------------------------
    def _tensor_chunk(self, blobs: list[bytes], offset: int, headers: list[ImageHeader]) -> torch.Tensor:
        with self.budget.hold(sum(h.pixels for h in headers)):
            if self._stream is None:
                return self._tensor_work(blobs, offset)
            with torch.cuda.stream(self._stream):
                out = self._tensor_work(blobs, offset)
            self._stream.synchronize()  # the forward (another stream) reads these pixels next
            return out

    def _tensor_work(self, blobs: list[bytes], offset: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(blobs)
        jpegs = [i for i, blob in enumerate(blobs) if self._nvjpeg_can(blob, offset + i)]
        if jpegs:
            try:
                decoded = decode_jpeg([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs],
                                      mode=ImageReadMode.RGB, device=self.device)
                for i, t in zip(jpegs, decoded, strict=True):
                    images[i] = self._resize_crop(t)  # (3, h, w) -> (3, S, S) uint8; the full-size one is freed
            except RuntimeError:  # one bad JPEG fails the batched call: decode these one by one below
                pass
        for i, blob in enumerate(blobs):
            if images[i] is None:
                im = decode_image(blob, self.max_pixels, offset + i)  # 415/413 for this image alone
                arr = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w) uint8
                im.close()
                if self.device.type == "cuda":
                    arr = arr.pin_memory().to(self.device, non_blocking=True)
                images[i] = self._resize_crop(arr)
        return self._normalise(torch.stack([t for t in images if t is not None]))

    def _nvjpeg_can(self, blob: bytes, index: int) -> bool:
        """Header checks (same limits and errors as Pillow's path), then: a baseline RGB/grey JPEG, complete."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(blob), formats=list(ALLOWED_FORMATS)) as im:
                    w, h = im.size
                    fmt, mode, progressive = im.format, im.mode, bool(im.info.get("progressive"))
            except Exception:  # noqa: BLE001 - undecodable or a bomb: decode_image gives the precise answer
                return False
        if w * h > self.max_pixels:
            raise PayloadTooLarge(f"images[{index}] has {w}x{h} = {w * h} pixels; the limit is {self.max_pixels}")
        return (fmt == "JPEG" and mode in ("RGB", "L") and not progressive and blob.startswith(_SOI)
                and blob.rstrip(b"\0").endswith(_EOI))

    def _resize_crop(self, t: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 -> (3, S, S) uint8: shortest side to S (antialiased), centre crop."""
        return resize_crop(t, self.size, self._interpolation)

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 -> float32 normalised with the model's mean and std."""
        return (batch.float().div_(255.0) - self._mean) / self._std


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) in at most ``parts`` contiguous chunks of near-equal size."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

