"""Pictures for tests: checks that a PNG answer is a real picture (it decodes, has a plausible size, and is not
blank), and world images packed as the archive a user uploads."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from residual.tiny import tasks

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


def world_archive(task: str, n: int) -> bytes:
    """``n`` train images of a world task as a tar in ImageFolder layout (``<class>/<i>.png``), as POST /datasets
    takes it."""
    images, labels, _ = tasks.task_images(task, "train", n=n)
    classes = tasks.TASKS[task].classes
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (array, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(array).save(png, "PNG")
            info = tarfile.TarInfo(f"{classes[label]}/{i}.png")
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()
