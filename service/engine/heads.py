"""Head analysis for the serving model: spectra, per-head descriptions and head-text alignment (issue: head API).

The API and the worker share this module:

- :class:`HeadService` (API process) computes spectra and descriptions once per basis (``?basis=ID``; default:
  :meth:`service.bases.BasisStore.resolve`) and caches them;
  every backbone forward runs on the model owner (the one thread of all forwards): analyses through the request
  batcher, and a basis build in chunks of ``chunk`` images, so classify batches interleave with it and a shutdown
  stops it between chunks;
- :func:`load_alignment_data` turns an alignment spec (world task, dataset id) into pixels and labels;
- :func:`alignment_report` runs the library's :func:`residual.heads.head_alignment` and adds the request context.

Samples: spectra's TwoNN and the text descriptions use up to ``heads_sample_images`` images of the basis's own
source (the world's reference set, a world task, or an uploaded dataset, spread over its classes); a basis built
elsewhere from a folder has none, and says so. An alignment request scores heads on one part of
its data and evaluates the ablation on another (world tasks: val and test splits; other data: stratified halves).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residual import Backbone, Basis, LinearisedLN, RawFeatures, decompose, project_units
from residual.dictionary import load_dictionary
from residual.heads import describe_component, describe_head, head_alignment, unit_spectra
from residual.spectral import k_at, participation_ratio
from residual.tiny import tasks
from residual.tiny.reference import REFERENCE_SIZE, reference_basis, reference_images
from service.artifacts import ArtifactStore
from service.bases import BasisInfo, BasisStore
from service.datasets import decoded_chunks, spread
from service.errors import InvalidRequest, NotFound
from service.pools import ModelOwner, Pool

__all__ = ["HeadService", "alignment_report", "heads_matrix", "load_alignment_data"]

Forward = Callable[[torch.Tensor], Awaitable[tuple[RawFeatures, torch.Tensor]]]
AlignmentData = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, str]


def load_alignment_data(spec: dict[str, Any], bb: Backbone, datasets_dir: Path) -> AlignmentData:
    """(score pixels, score labels, eval pixels or None, eval labels or None, split description)."""
    if spec.get("world"):
        w = spec["world"]  # rendered at the world's size; pixels_from_arrays resizes them as one batch
        s_img, s_lab, _ = tasks.task_images(w["task"], "val", n=w["score"])
        e_img, e_lab, _ = tasks.task_images(w["task"], "test", n=w["eval"])
        return (bb.pixels_from_arrays(s_img), torch.from_numpy(s_lab), bb.pixels_from_arrays(e_img),
                torch.from_numpy(e_lab), "world task: scores on the val split, ablation on the test split")
    folder = datasets_dir / spec["dataset_id"]
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["files"]
    labels = [spec["class_map"][manifest["classes"][idx]] for _, idx in files]
    pixels = torch.cat(list(decoded_chunks(bb.preprocess, folder, [rel for rel, _ in files])))
    return pixels, torch.tensor(labels), None, None, ""


def alignment_report(units: torch.Tensor, labels: torch.Tensor, eval_units: torch.Tensor | None,
                     eval_labels: torch.Tensor | None, class_emb: torch.Tensor, bb: Backbone, spec: dict[str, Any],
                     split: str, basis: Basis, basis_ref: dict[str, Any]) -> dict[str, Any]:
    """The library's head alignment plus the request context (model, label set, dataset) and, per head, the
    basis's spectrum (``k_90``, ``evr_1``): how specialised each head is next to how well it aligns."""
    g = bb.geometry
    p = spec.get("params", {})
    report = head_alignment(units, labels, class_emb, bb.logit_scale, g.layers, g.heads, eval_units, eval_labels,
                            fractions=p.get("fractions"), seeds=p.get("seeds", 10),
                            ablation=p.get("ablation", "mean"), top=p.get("top", 5))
    if split:
        report["split"] = split
    spectrum = {(r.layer, r.head): r for r in unit_spectra(basis, n_evr=1) if r.type == "head"}
    for row in report["heads"]:
        r = spectrum[(row["layer"], row["head"])]
        row |= {"k_90": r.k_90, "evr_1": round(r.evr_1, 6)}
    return {"model": bb.name, "weights_id": bb.weights_id, "classes": spec["classes"],
            "label_set_id": spec.get("label_set_id"), "dataset": _dataset_name(spec), "basis": basis_ref, **report}


def _dataset_name(spec: dict[str, Any]) -> str:
    if spec.get("world"):
        return f"world:{spec['world']['task']}"
    return str(spec.get("dataset_id") or "inline")


class HeadService:
    """Spectra and descriptions of the serving model's heads, cached per basis."""

    def __init__(self, bb: Backbone, ln: LinearisedLN, forward: Forward, owner: ModelOwner, io: Pool, chunk: int,
                 sample_images: int, artifacts: ArtifactStore, bases: BasisStore,
                 dictionary_embeddings: Callable[[list[str]], torch.Tensor], dictionary_path: Path | None = None,
                 reference_images_n: int = REFERENCE_SIZE, on_basis_images: Callable[[int], None] | None = None
                 ) -> None:
        self.bb, self.ln, self._forward, self.chunk = bb, ln, forward, chunk
        self.owner, self.io = owner, io
        self.sample_images = sample_images
        self.artifacts, self.bases = artifacts, bases
        self.reference_images_n = reference_images_n
        self._on_basis_images = on_basis_images
        self._dictionary_embeddings = dictionary_embeddings
        self._dictionary_path = dictionary_path
        self._samples: OrderedDict[str, torch.Tensor | None] = OrderedDict()  # sample key -> (n, U, d) units
        self._spectra: dict[str, dict[str, Any]] = {}  # basis id -> GET /heads body
        self._dictionary: tuple[list[str], torch.Tensor] | None = None
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        self._build_lock = threading.Lock()

    # ---- shared pieces ----------------------------------------------------------------------------------------
    async def units(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, U, d) output-space units, through the batcher in chunks."""
        parts = []
        for i in range(0, pixels.shape[0], self.chunk):
            raw, _ = await self._forward(pixels[i : i + self.chunk])
            parts.append(await self.io.run(lambda r=raw: project_units(r, self.ln).float().cpu()))
        return torch.cat(parts)

    def _owner_units(self, pixels: torch.Tensor) -> torch.Tensor:
        """Blocking (an io thread): (n, 3, S, S) -> (n, U, d), each chunk one job of the model owner."""
        parts = []
        for i in range(0, pixels.shape[0], self.chunk):
            self.owner.check_running()
            piece = pixels[i : i + self.chunk]
            parts.append(self.owner.call(lambda x=piece: decompose(self.bb, x, self.ln).units))
            if self._on_basis_images is not None:
                self._on_basis_images(int(piece.shape[0]))
        return torch.cat(parts)

    def basis(self, ref: str | None = None) -> tuple[BasisInfo, Basis]:
        """Blocking (an io thread): ``ref`` (None: the default) -> (entry, basis); 404 / 409 as
        :meth:`BasisStore.resolve`. The world basis (operator opt-in only) is built once, on the model owner chunk
        by chunk."""
        info = self.bases.resolve(ref)
        if info is None:
            with self._build_lock:  # single flight: concurrent first requests share one build
                info = self.bases.resolve(ref)
                if info is None:
                    built = reference_basis(self.bb, cache_dir=self.artifacts.bases_dir, units=self._owner_units,
                                            n=self.reference_images_n)
                    info = self.bases.info_of(built)
                    if info is None:
                        raise RuntimeError("the world basis was built but is not in the store")
        return info, self.bases.load(info)

    def _sample_pixels(self, source: dict[str, Any]) -> torch.Tensor | None:
        """Blocking: up to ``sample_images`` images of the basis's own source, or None when the server cannot
        read them (a basis built elsewhere from a folder)."""
        n = self.sample_images
        kind = source.get("kind")
        if kind == "world":
            return self.bb.pixels_from_arrays(reference_images(min(n, int(source.get("n") or n))))
        if kind == "world-task":
            images, _, _ = tasks.task_images(source["task"], source.get("split", "train"),
                                             n=min(n, int(source.get("n") or n)))
            return self.bb.pixels_from_arrays(images)
        dataset = source.get("dataset")
        folder = self.artifacts.datasets_dir / str(dataset)
        if not dataset or not (folder / "manifest.json").is_file():
            return None
        files = json.loads((folder / "manifest.json").read_text())["files"]
        picked = [files[i][0] for i in spread(len(files), n)]
        return torch.cat(list(decoded_chunks(self.bb.preprocess, folder, picked)))

    async def sample(self, info: BasisInfo) -> torch.Tensor | None:
        """(n, U, d) units of images from the basis's source (TwoNN, descriptions); None when unavailable."""
        key = json.dumps(info.source, sort_keys=True)
        if key not in self._samples:
            pixels = await self.io.run(self._sample_pixels, info.source)
            self._samples[key] = None if pixels is None else await self.units(pixels)
            while len(self._samples) > 2:  # a sample of a large model is hundreds of MB
                self._samples.popitem(last=False)
        return self._samples[key]

    def dictionary(self) -> tuple[list[str], torch.Tensor]:
        with self._thread_lock:
            if self._dictionary is None:
                texts = load_dictionary(self._dictionary_path)
                self._dictionary = (texts, self._dictionary_embeddings(texts))
            return self._dictionary

    # ---- GET /heads ---------------------------------------------------------------------------------------------
    async def spectra(self, ref: str | None = None) -> dict[str, Any]:
        async with self._lock:
            info, basis = await self.io.run(self.basis, ref)
            if info.basis_id not in self._spectra:
                sample = await self.sample(info)
                rows = await self.io.run(unit_spectra, basis, sample, 32)
                self._spectra[info.basis_id] = {
                    "model": self.bb.name, "weights_id": self.bb.weights_id, "basis": info.ref(),
                    "basis_hash": basis.hash, "basis_samples": basis.n_samples,
                    "twonn_samples": 0 if sample is None else int(sample.shape[0]),
                    "geometry": {"layers": self.bb.geometry.layers, "heads": self.bb.geometry.heads,
                                 "head_dim": self.bb.geometry.head_dim, "out_dim": self.bb.geometry.out_dim},
                    "units": [r.to_dict() for r in rows]}
                if sample is None:
                    self._spectra[info.basis_id]["twonn_note"] = _NO_SAMPLE
            return self._spectra[info.basis_id]

    def head_index(self, layer: int, head: int) -> int:
        g = self.bb.geometry
        if not (0 <= layer < g.layers and 0 <= head < g.heads):
            raise NotFound(f"no head ({layer}, {head}); the model has {g.layers} layers x {g.heads} heads")
        return layer * g.heads + head

    # ---- GET /heads/{layer}/{head} --------------------------------------------------------------------------------
    async def head_detail(self, layer: int, head: int, atoms: int, components: int, component_atoms: int,
                          method: str, ref: str | None = None) -> dict[str, Any]:
        idx = self.head_index(layer, head)
        g = self.bb.geometry
        unit = 1 + g.layers + idx
        spectra = await self.spectra(ref)
        info, basis = await self.io.run(self.basis, ref)
        sample = await self.sample(info)
        texts, dic = await self.io.run(self.dictionary)

        def compute() -> dict[str, Any]:
            eig = basis.eigenvalues[unit]  # (d,)
            evr = eig.cumsum(0) / eig.sum().clamp_min(1e-30)
            comps = []
            for c in range(min(components, basis.head_components.shape[1])):
                d = describe_component(basis.head_components[idx, c], dic, component_atoms)
                comps.append({"component": c, "eigenvalue": float(eig[c]),
                              "explained_variance_ratio": float(eig[c] / eig.sum().clamp_min(1e-30)),
                              "texts": d.named(texts)})
            description: dict[str, Any] | None = None
            if sample is not None:
                desc = describe_head(sample[:, unit], dic, atoms, method)
                description = {"method": method, "samples": int(sample.shape[0]), "dictionary_size": len(texts),
                               "texts": desc.named(texts), "explained": [round(v, 6) for v in desc.explained]}
            out = {"layer": layer, "head": head, "unit": unit, "basis": info.ref(), "basis_hash": basis.hash,
                   "summary": spectra["units"][unit],
                   "eigenvalues": [float(v) for v in eig], "evr": [round(float(v), 6) for v in evr],
                   "k_90": int(k_at(evr, 0.9)), "k_99": int(k_at(evr, 0.99)),
                   "participation_ratio": float(participation_ratio(eig)),
                   "description": description, "components": comps}
            if description is None:
                out["description_note"] = _NO_SAMPLE
            return out

        return await self.io.run(compute)

    # ---- POST /heads/alignment (synchronous path) -----------------------------------------------------------------
    async def alignment(self, spec: dict[str, Any], class_emb: torch.Tensor,
                        inline: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """``inline``: (pixels, labels) already decoded; else the spec's world task or dataset."""
        info, basis = await self.io.run(self.basis, spec.get("basis"))
        if inline is not None:
            s_pix, s_lab, e_pix, e_lab, split = inline[0], inline[1], None, None, ""
        else:
            s_pix, s_lab, e_pix, e_lab, split = await self.io.run(load_alignment_data, spec, self.bb,
                                                                   self.artifacts.datasets_dir)
        s_units = await self.units(s_pix)
        e_units = await self.units(e_pix) if e_pix is not None else None
        return await self.io.run(alignment_report, s_units, s_lab, e_units, e_lab, class_emb, self.bb, spec,
                                 split, basis, info.ref())


_NO_SAMPLE = ("the images behind this basis are not in the artifact store (it was built elsewhere), so there is no "
              "sample for TwoNN and head descriptions; build the basis with POST /bases on an uploaded dataset")


def heads_matrix(report: dict[str, Any], key: str, layers: int, heads: int) -> np.ndarray:
    """(L, H) matrix of one per-head field of an alignment report or spectra rows."""
    rows = report["heads"] if "heads" in report else [u for u in report["units"] if u["type"] == "head"]
    out = np.full((layers, heads), np.nan)
    for r in rows:
        value = r.get(key)
        if value is None:
            raise InvalidRequest(f"no per-head value {key!r}")
        out[r["layer"], r["head"]] = float(value)
    return out
