"""Image decoding with limits, shared by the serving pipeline and the dataset store.

- :func:`decode_base64`: base64 text or a data URI -> bytes (whitespace and line breaks inside are ignored);
- :func:`probe`: the header only (format allowlist by content, pixel ceiling): 415 / 413 before any pixel is
  decoded; a request's images are all probed before the first is decoded, so its total pixels can be checked;
- :func:`decode_image`: bytes -> RGB, first frame only. A JPEG much larger than its destination is decoded in
  draft mode (DCT scaling by 1/2, 1/4 or 1/8 while decoding, never below twice the size it is resized to): what an
  antialiased resize would do anyway, at a fraction of the memory;
- :class:`PixelBudget`: the decoded pixels this process holds at once; a decoder waits for room.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia

__all__ = ["ALLOWED_FORMATS", "DRAFT_MIN_PIXELS", "ImageHeader", "PixelBudget", "decode_base64", "decode_image",
           "looks_like_image", "probe"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DRAFT_MIN_PIXELS = 4_000_000
"""JPEGs of at least this many pixels decode in draft mode when they are resized to a small input anyway."""

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")
_ALPHABET = re.compile(rb"[A-Za-z0-9+/=]*")
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def decode_base64(text: str, index: int, what: str = "images") -> bytes:
    """A base64 string or data URI -> bytes; spaces and line breaks (as MIME base64 wraps it) are ignored. 422
    naming the item when it is not base64."""
    match = _DATA_URI.match(text)
    payload = text[match.end() :] if match else text
    try:
        raw = payload.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{what}[{index}] is not base64 (it holds non-ASCII characters)") from exc
    if _WHITESPACE.search(raw):
        raw = _WHITESPACE.sub(b"", raw)
    if len(raw) % 4 and not raw.endswith(b"="):  # encoders that drop the padding: restore it
        raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        if _ALPHABET.fullmatch(raw):  # base64 characters that do not decode: undecodable content, like a bad image
            raise UnsupportedMedia(f"{what}[{index}] is not a decodable image (its base64 does not decode)") from exc
        raise InvalidRequest(f"{what}[{index}] is not valid base64 or a base64 data URI") from exc


def looks_like_image(text: str) -> bool:
    """Whether a string is plausibly an encoded image (a data URI, or base64 of PNG/JPEG/GIF/WebP bytes)."""
    if text[:11].lower() == "data:image/":
        return True
    head = text[:64].strip()
    if len(head) < 16:
        return False
    try:
        raw = base64.b64decode(head[: len(head) // 4 * 4], validate=False)
    except (binascii.Error, ValueError):
        return False
    return raw.startswith(_MAGIC) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes, max_pixels: int, index: int) -> Image.Image:
    """Header-only open with every check; the caller loads (or closes) the image."""
    if not data:
        raise UnsupportedMedia(f"images[{index}] is empty")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # header only
    except Image.DecompressionBombError as exc:  # more than twice Pillow's threshold: refused inside open()
        raise PayloadTooLarge(f"images[{index}] is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"images[{index}] is not a decodable {'/'.join(ALLOWED_FORMATS)} image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnsupportedMedia(f"images[{index}] could not be decoded: {exc}") from exc
    w, h = im.size
    if w * h > max_pixels:  # our ceiling, checked before any pixel is decoded
        im.close()
        raise PayloadTooLarge(f"images[{index}] has {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if any(issubclass(c.category, Image.DecompressionBombWarning) for c in caught):
        im.close()
        raise PayloadTooLarge(f"images[{index}] has {w}x{h} pixels, over Pillow's decompression-bomb threshold")
    return im


def probe(data: bytes, max_pixels: int, index: int = 0) -> ImageHeader:
    """The header of an encoded image (nothing decoded): 415 for other formats or garbage, 413 over the ceiling."""
    im = _open(data, max_pixels, index)
    try:
        return ImageHeader(im.size[0], im.size[1], str(im.format or ""))
    finally:
        im.close()


def decode_image(data: bytes, max_pixels: int, index: int = 0, draft_to: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image (first frame). 415 for other formats or undecodable data, 413 over the ceiling.

    ``draft_to``: the side the image will be resized to; a large JPEG is then decoded at the smallest DCT scale that
    keeps both sides at twice that or more (the pixels differ from a full decode by what the antialiased resize
    averages away; tests/service/test_pipeline.py states the bound).
    """
    im = _open(data, max_pixels, index)
    try:
        if draft_to is not None and im.format == "JPEG" and im.size[0] * im.size[1] >= DRAFT_MIN_PIXELS:
            im.draft("RGB", (2 * draft_to, 2 * draft_to))
        im.seek(0)
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise UnsupportedMedia(f"images[{index}] could not be decoded: {exc}") from exc


class PixelBudget:
    """At most ``limit`` decoded pixels held at once in this process; :meth:`hold` waits for room.

    One image over the limit alone is let through when nothing else is held (the per-image ceiling bounds it).
    """

    def __init__(self, limit: int, on_change: object = None) -> None:
        self.limit = limit
        self.held = 0
        self._cond = threading.Condition()
        self._on_change = on_change

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            while self.held and self.held + pixels > self.limit:
                self._cond.wait()
            self.held += pixels
            self._report()
        try:
            yield
        finally:
            with self._cond:
                self.held -= pixels
                self._report()
                self._cond.notify_all()

    def _report(self) -> None:
        if callable(self._on_change):
            self._on_change(self.held)
