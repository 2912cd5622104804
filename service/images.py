"""Image decoding with limits: format allowlist by content, pixel ceiling from the header, first frame only."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from service.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia

__all__ = ["ALLOWED_FORMATS", "decode_base64", "decode_image"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, index: int) -> bytes:
    """A base64 string or data URI -> bytes; 422 naming the image index when it is not base64."""
    match = _DATA_URI.match(text)
    payload = text[match.end() :] if match else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"images[{index}] is not valid base64 or a base64 data URI") from exc


def decode_image(data: bytes, max_pixels: int, index: int = 0) -> Image.Image:
    """Bytes -> RGB PIL image (first frame). 415 for other formats or undecodable data, 413 over the ceiling."""
    if not data:
        raise UnsupportedMedia(f"images[{index}] is empty")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # header only
        w, h = im.size
        if w * h > max_pixels:  # our ceiling, checked before any pixel is decoded
            raise PayloadTooLarge(f"images[{index}] has {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        if any(issubclass(c.category, Image.DecompressionBombWarning) for c in caught):
            raise PayloadTooLarge(f"images[{index}] has {w}x{h} pixels, over Pillow's decompression-bomb threshold")
        im.seek(0)
        im.load()
        return im.convert("RGB")
    except Image.DecompressionBombError as exc:  # more than twice Pillow's threshold: refused inside open()
        raise PayloadTooLarge(f"images[{index}] is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"images[{index}] is not a decodable {'/'.join(ALLOWED_FORMATS)} image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise UnsupportedMedia(f"images[{index}] could not be decoded: {exc}") from exc
