"""Benchmark tasks of the embedded world: label sets and fixed train/val/test image sets by seed.

Each task names a scene attribute, the scene kind its images come from, the class names (in the world's
vocabulary) and the zero-shot prompt templates. Templates are deliberately *not* the training captions'
phrasings, so zero-shot accuracy measures transfer, not memorised strings.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from residual.tiny import world

__all__ = ["SPLIT_SIZES", "TASKS", "Task", "task_image_chunks", "task_images"]


@dataclass(frozen=True)
class Task:
    """A world classification task."""

    name: str  # task id, e.g. "shape"
    attribute: str  # the Scene field that is the label
    kind: str | None  # scene kind the images come from (None: any kind)
    classes: tuple[str, ...]  # class names as they enter the templates
    values: tuple[str, ...]  # the Scene attribute value of each class, same order
    templates: tuple[str, ...]  # zero-shot prompt templates, each with one "{}"


def _t(name: str, attribute: str, kind: str | None, values: tuple[str, ...], templates: tuple[str, ...],
       classes: tuple[str, ...] | None = None) -> Task:
    return Task(name, attribute, kind, classes or values, values, templates)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _t("shape", "shape", "object", world.SHAPES,
           ("a photo of a {}.", "a {} shape.", "an image with a {} in it.")),
        _t("colour", "colour", "object", tuple(world.COLOURS),
           ("a photo of a {} object.", "something coloured {}.", "a {} thing.")),
        _t("size", "size", "object", world.SIZES,
           ("a photo of a {} object.", "a {} shape.", "the object is {}.")),
        _t("position", "position", "object", world.POSITIONS,
           ("an object on the {} of the image.", "a shape placed {}.", "a photo with something at the {}."),
           classes=("left", "right", "top", "bottom", "middle")),
        _t("background", "background", None, tuple(world.BACKGROUNDS),
           ("a photo with a {} background.", "something in front of a {} backdrop.")),
        _t("texture", "texture", None, world.TEXTURES,
           ("a photo with a {} background.", "a {} pattern behind the object.")),
        _t("digit", "digit", "digit", world.DIGITS,
           ("a photo of the number {}.", "the digit {} written down.", "a {} sign."),
           classes=world.DIGIT_WORDS),
        _t("count", "count", "multi", world.COUNTS,
           ("a photo of {} objects.", "{} shapes.", "there are {} things in the picture."),
           classes=("one", "two", "three", "four")),
    )
}

SPLIT_SIZES = {"train": 2000, "val": 500, "test": 1000}
_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}


def _scene_for(task: Task, label: int, rng: np.random.Generator) -> world.Scene:
    value = task.values[label]
    if task.name == "count":  # one object is an "object" scene of a small shape, the rest are "multi" scenes
        if value == "one":
            return world.sample_scene(rng, "object", size="small")
        return world.sample_scene(rng, "multi", count=value)
    return world.sample_scene(rng, task.kind, **{task.attribute: value})


def task_image_chunks(
    task: str | Task, split: str, n: int | None = None, side: int = 48, seed: int = 0, chunk: int = 256
) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """(labels (n,), chunks of the images): :func:`task_images` rendered ``chunk`` images at a time (the same
    images; the labels and scenes come first, cheaply), so a caller can report progress and bound memory."""
    t = TASKS[task] if isinstance(task, str) else task
    labels, scenes, base = _plan(t, split, n, seed)

    def chunks() -> Iterator[np.ndarray]:
        for i in range(0, len(scenes), chunk):
            yield world.render_batch(scenes[i : i + chunk], side=side, seed=base * 7919 + i)

    return labels, chunks()


def _plan(t: Task, split: str, n: int | None, seed: int) -> tuple[np.ndarray, list[world.Scene], int]:
    if split not in _SPLIT_SALT:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_SALT)}")
    n = SPLIT_SIZES[split] if n is None else n
    base = zlib.crc32(t.name.encode()) * 10 + _SPLIT_SALT[split] + 1000003 * seed
    rng = np.random.default_rng(base)
    labels = rng.permutation(np.arange(n) % len(t.classes)).astype(np.int64)
    scenes = [_scene_for(t, int(lab), rng) for lab in labels]
    return labels, scenes, base


def task_images(
    task: str | Task, split: str, n: int | None = None, side: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[world.Scene]]:
    """The fixed image set of a task split: (images (n, side, side, 3) uint8, labels (n,) int64, scenes).

    Classes are balanced (label i = index mod number of classes, then shuffled). The set depends only on the
    task name, the split, ``n``, ``side`` and ``seed``.
    """
    t = TASKS[task] if isinstance(task, str) else task
    labels, scenes, base = _plan(t, split, n, seed)
    images = world.render_batch(scenes, side=side, seed=base * 7919)
    return images, labels, scenes
