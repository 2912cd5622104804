"""Where images come from: a world task of the embedded model, the world's reference mixture, or an uploaded dataset.

The one service module that imports ``residual.tiny`` (the procedural world). Requests name a source as a string:

- ``world:<task>`` (``world:shape``, ``world:colour``, ...): a benchmark task of the world, with its own label set;
- ``world:mixture``: the world's reference set (the training mixture; bases only);
- ``ds-<20 hex>``: a dataset uploaded with ``POST /datasets``.

:func:`parse_source` turns such a string into a typed source (422 with the list of tasks when it is none of them);
the other functions turn a typed source into decoded pixels, chunk by chunk, for fits, bases and head analyses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from residual import Backbone, Basis
from residual.basis import fit_basis
from residual.tiny import tasks as _tasks
from residual.tiny.reference import (
    REFERENCE_SIZE,
    reference_batches,
    reference_images,
    reference_source,
)
from service.errors import InvalidRequest
from service.stores.datasets import decoded_chunks, spread

__all__ = ["CHUNK", "DATASET_ID", "REFERENCE_SIZE", "DatasetSource", "MixtureSource", "Source", "WorldTaskSource",
           "alignment_data", "basis_chunks", "dataset_files", "feature_key", "parse_source", "sample_pixels",
           "source_name", "split_chunks", "task_label_set", "world_reference_basis",
           "world_task_names", "world_tasks"]

CHUNK = 256
"""Images decoded (or rendered) and extracted at a time: memory holds one chunk of pixels whatever the source."""

DATASET_ID = re.compile(r"^ds-[0-9a-f]{20}$")
DEFAULT_SIZES = {"train": 2000, "val": 500, "test": 1000}


class WorldTaskSource(BaseModel):
    """A benchmark task of the embedded world; ``sizes``: images per split."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["world-task"] = "world-task"
    task: str
    sizes: dict[str, int] = Field(default_factory=dict)


class MixtureSource(BaseModel):
    """The world's reference set (the training mixture)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["world"] = "world"


class DatasetSource(BaseModel):
    """An uploaded dataset; ``class_map``: the label-set index of each of its class names (fits and alignments)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dataset"] = "dataset"
    dataset_id: str
    class_map: dict[str, int] | None = None


Source = Annotated[WorldTaskSource | MixtureSource | DatasetSource, Field(discriminator="kind")]


def world_task_names() -> list[str]:
    return sorted(_tasks.TASKS)


def world_tasks() -> dict[str, dict[str, list[str]]]:
    """Every world task with its classes and templates (the playground's presets)."""
    return {name: {"classes": list(t.classes), "templates": list(t.templates)} for name, t in _tasks.TASKS.items()}


def task_label_set(task: str) -> tuple[list[str], list[str]]:
    t = _tasks.TASKS[task]
    return list(t.classes), list(t.templates)


def parse_source(value: str, *, mixture: bool = False) -> WorldTaskSource | MixtureSource | DatasetSource:
    """``world:<task>``, ``world:mixture`` (only with ``mixture``) or a dataset id; 422 naming the choices."""
    tasks_list = ", ".join(f"world:{t}" for t in world_task_names())
    if value.startswith("world:"):
        task = value.removeprefix("world:")
        if mixture and task == "mixture":
            return MixtureSource()
        if task in _tasks.TASKS:
            return WorldTaskSource(task=task)
        extra = " or world:mixture" if mixture else ""
        raise InvalidRequest(f"unknown world task {task[:64]!r}; choose from {tasks_list}{extra}")
    if DATASET_ID.fullmatch(value):
        return DatasetSource(dataset_id=value)
    shown = value[:64] + ("..." if len(value) > 64 else "")
    raise InvalidRequest(f"dataset {shown!r} is neither a dataset id ('ds-' and 20 hex digits, from POST /datasets) "
                         f"nor a world task ({tasks_list}{' or world:mixture' if mixture else ''})")


# ---- reading a dataset -------------------------------------------------------------------------------------------


def dataset_files(datasets_dir: Path, dataset_id: str) -> tuple[Path, list[str], list[tuple[str, int]]]:
    """(folder, class names, [(file, class index)]) of a stored dataset (validated at upload)."""
    folder = datasets_dir / dataset_id
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder, list(manifest["classes"]), [(str(f), int(c)) for f, c in manifest["files"]]


def _targets(src: DatasetSource, classes: list[str], files: list[tuple[str, int]]) -> list[int]:
    class_map = src.class_map or {c: i for i, c in enumerate(classes)}
    return [class_map[classes[idx]] for _, idx in files]


# ---- fits: pixel chunks per split --------------------------------------------------------------------------------


def split_chunks(src: WorldTaskSource | DatasetSource, bb: Backbone, datasets_dir: Path
                 ) -> dict[str, tuple[torch.Tensor, int, Iterator[torch.Tensor]]]:
    """Per split: (labels (n,), n, chunks of (<= CHUNK, 3, S, S) pixels). World tasks have train, val and test
    (rendered at the world's size, resized as one batch per chunk); a dataset has train only (its fit splits it)."""
    if isinstance(src, WorldTaskSource):
        out = {}
        for split in ("train", "val", "test"):
            n = int(src.sizes.get(split, DEFAULT_SIZES[split]))
            labels, chunks = _tasks.task_image_chunks(src.task, split, n=n, chunk=CHUNK)
            out[split] = (torch.from_numpy(labels), n, (bb.pixels_from_arrays(c) for c in chunks))
        return out
    folder, classes, files = dataset_files(datasets_dir, src.dataset_id)
    targets = torch.tensor(_targets(src, classes, files))
    return {"train": (targets, len(files), decoded_chunks(bb.preprocess, folder, [f for f, _ in files], CHUNK))}


def feature_key(src: WorldTaskSource | DatasetSource) -> str:
    """The feature cache's key of a source (with the world sizes: other sizes are other images)."""
    if isinstance(src, WorldTaskSource):
        s = {k: int(src.sizes.get(k, DEFAULT_SIZES[k])) for k in ("train", "val", "test")}
        return f"world-{src.task}-{s['train']}-{s['val']}-{s['test']}"
    return src.dataset_id


def source_name(src: WorldTaskSource | MixtureSource | DatasetSource | None) -> str:
    if isinstance(src, WorldTaskSource):
        return f"world:{src.task}"
    if isinstance(src, MixtureSource):
        return "world:mixture"
    if isinstance(src, DatasetSource):
        return src.dataset_id
    return "inline"


# ---- bases ---------------------------------------------------------------------------------------------------------


def basis_chunks(src: WorldTaskSource | MixtureSource | DatasetSource, bb: Backbone, datasets_dir: Path,
                 max_images: int) -> tuple[Iterator[torch.Tensor], int, dict[str, Any]]:
    """(pixel chunks, number of images, the basis's source record) for ``POST /bases``."""
    if isinstance(src, MixtureSource):
        n = min(max_images, REFERENCE_SIZE)
        return reference_batches(bb, n), n, reference_source(n)
    if isinstance(src, WorldTaskSource):
        labels, images = _tasks.task_image_chunks(src.task, "train", n=max_images, chunk=CHUNK)
        n = len(labels)
        return ((bb.pixels_from_arrays(c) for c in images), n,
                {"kind": "world-task", "task": src.task, "split": "train", "n": n})
    folder, _, files = dataset_files(datasets_dir, src.dataset_id)
    picks = spread(len(files), max_images)
    chunks = decoded_chunks(bb.preprocess, folder, [files[j][0] for j in picks], CHUNK)
    return chunks, len(picks), {"kind": "dataset", "dataset": src.dataset_id, "n": len(picks)}


def world_reference_basis(bb: Backbone, n: int, units: Any = None) -> Basis:
    """The per-unit PCA of the first ``n`` images of the world's reference set (``units``: how a pixel batch becomes
    (n, U, d) units; default the library's decomposition)."""
    name = "world-reference" if n == REFERENCE_SIZE else f"world-reference-{n}"
    return fit_basis(bb, reference_batches(bb, n), source=reference_source(n), units=units, name=name)


# ---- head analyses --------------------------------------------------------------------------------------------------


def alignment_data(src: WorldTaskSource | DatasetSource, bb: Backbone, datasets_dir: Path
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, str]:
    """(score pixels, score labels, eval pixels or None, eval labels or None, split description)."""
    if isinstance(src, WorldTaskSource):  # rendered at the world's size; pixels_from_arrays resizes as one batch
        s_img, s_lab, _ = _tasks.task_images(src.task, "val", n=int(src.sizes.get("score", 500)))
        e_img, e_lab, _ = _tasks.task_images(src.task, "test", n=int(src.sizes.get("eval", 1000)))
        return (bb.pixels_from_arrays(s_img), torch.from_numpy(s_lab), bb.pixels_from_arrays(e_img),
                torch.from_numpy(e_lab), "world task: scores on the val split, ablation on the test split")
    folder, classes, files = dataset_files(datasets_dir, src.dataset_id)
    pixels = torch.cat(list(decoded_chunks(bb.preprocess, folder, [f for f, _ in files], CHUNK)))
    return pixels, torch.tensor(_targets(src, classes, files)), None, None, ""


def sample_pixels(source: dict[str, Any], n: int, bb: Backbone, datasets_dir: Path) -> torch.Tensor | None:
    """Up to ``n`` images of a basis's own source (its ``source`` record), or None when the server cannot read
    them (a basis built elsewhere from a folder)."""
    kind = source.get("kind")
    if kind == "world":
        return bb.pixels_from_arrays(reference_images(min(n, int(source.get("n") or n))))
    if kind == "world-task":
        images, _, _ = _tasks.task_images(source["task"], source.get("split", "train"),
                                          n=min(n, int(source.get("n") or n)))
        return bb.pixels_from_arrays(images)
    dataset = source.get("dataset")
    if not dataset or not DATASET_ID.fullmatch(str(dataset)) or not (datasets_dir / str(dataset) / "manifest.json"
                                                                       ).is_file():
        return None
    folder, _, files = dataset_files(datasets_dir, str(dataset))
    picked = [files[i][0] for i in spread(len(files), n)]
    return torch.cat(list(decoded_chunks(bb.preprocess, folder, picked, CHUNK)))
