"""Checks that a PNG answer is a real picture: it decodes, has a plausible size, and is not blank."""

from __future__ import annotations

import io

from PIL import Image

PNG = b"\x89PNG\r\n\x1a\n"


def assert_picture(data: bytes, min_width: int = 200, min_height: int = 150, min_colours: int = 20) -> Image.Image:
    """The bytes are a PNG of at least ``min_width`` x ``min_height`` with at least ``min_colours`` colours (a
    blank or single-colour frame has one or two)."""
    assert data[:8] == PNG, data[:16]
    image = Image.open(io.BytesIO(data))
    image.load()
    width, height = image.size
    assert width >= min_width and height >= min_height, image.size
    colours = image.convert("RGB").getcolors(maxcolors=width * height) or []
    assert len(colours) >= min_colours, f"{len(colours)} colours: blank or nearly blank"
    return image
