"""Head analyses on the serving model (API process): spectra, per-head descriptions, small head alignments.

:class:`HeadService` computes spectra and descriptions once per basis (``?basis=ID``; default:
:meth:`service.stores.bases.BasisStore.resolve`) and caches them. Every backbone forward runs on the model owner
(the one thread of all forwards): analyses go through the request batcher, and a world basis build (operator opt-in)
goes chunk by chunk, so classify batches interleave with it and a shutdown stops it between chunks.

Samples: spectra's TwoNN and the text descriptions use up to ``sample_images`` images of the basis's own source
(``service.sources.sample_pixels``); a basis built elsewhere from a folder has none, and says so. An alignment
request scores heads on one part of its data and evaluates the ablation on another (world tasks: val and test
splits; other data: stratified halves); large ones run on the worker (``service.jobs.alignment``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from residual import Basis, RawFeatures, decompose, project_units
from residual.dictionary import load_dictionary
from residual.heads import describe_component, describe_head, unit_spectra
from residual.spectral import explained_variance, k_at, participation_ratio
from service import sources
from service.analysis import alignment_report
from service.engine.model import ServingModel
from service.engine.pools import ModelOwner, Pool
from service.errors import NotFound
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisInfo, BasisStore

__all__ = ["HeadConfig", "HeadService"]

Forward = Callable[[torch.Tensor], Awaitable[tuple[RawFeatures, torch.Tensor]]]


@dataclass(frozen=True)
class HeadConfig:
    chunk: int  # images per forward (a chunk must fit the batcher's queue)
    sample_images: int  # images of a basis's source behind TwoNN and descriptions
    reference_images: int  # world images behind the world basis (opt-in)
    dictionary: Path | None  # text dictionary (None: the shipped one)


class HeadService:
    """Spectra and descriptions of the serving model's heads, cached per basis."""

    def __init__(self, model: ServingModel, forward: Forward, owner: ModelOwner, pool: Pool, config: HeadConfig,
                 artifacts: ArtifactStore, bases: BasisStore,
                 dictionary_embeddings: Callable[[list[str]], torch.Tensor],
                 on_basis_images: Callable[[int], None] | None = None) -> None:
        self.model, self.bb, self.ln = model, model.backbone, model.ln
        self._forward, self.owner, self.io, self.config = forward, owner, pool, config
        self.chunk = config.chunk
        self.artifacts, self.bases = artifacts, bases
        self._on_basis_images = on_basis_images
        self._dictionary_embeddings = dictionary_embeddings
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
        by chunk, and published in the store."""
        info = self.bases.resolve(ref)
        if info is None:
            with self._build_lock:  # single flight in this process; the store's lock across processes and pods
                info = self.bases.world(lambda: sources.world_reference_basis(
                    self.bb, self.config.reference_images, self._owner_units))
        return info, self.bases.load(info)

    async def sample(self, info: BasisInfo) -> torch.Tensor | None:
        """(n, U, d) units of images from the basis's source (TwoNN, descriptions); None when unavailable."""
        key = json.dumps(info.source, sort_keys=True)
        if key not in self._samples:
            pixels = await self.io.run(sources.sample_pixels, info.source, self.config.sample_images, self.bb,
                                       self.artifacts.datasets_dir)
            self._samples[key] = None if pixels is None else await self.units(pixels)
            while len(self._samples) > 2:  # a sample of a large model is hundreds of MB
                self._samples.popitem(last=False)
        return self._samples[key]

    def dictionary(self) -> tuple[list[str], torch.Tensor]:
        with self._thread_lock:
            if self._dictionary is None:
                texts = load_dictionary(self.config.dictionary)
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
                    "model": self.model.name, "weights_id": self.bb.weights_id, "basis": info.ref(),
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
        unit = self.bb.geometry.head_unit(layer, head)
        spectra = await self.spectra(ref)
        info, basis = await self.io.run(self.basis, ref)
        sample = await self.sample(info)
        texts, dic = await self.io.run(self.dictionary)

        def compute() -> dict[str, Any]:
            eig = basis.eigenvalues[unit]  # (d,)
            evr = explained_variance(eig)
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
            out = {"model": self.model.name, "layer": layer, "head": head, "unit": unit, "basis": info.ref(),
                   "basis_hash": basis.hash,
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
    async def alignment(self, source: sources.WorldTaskSource | sources.DatasetSource | None, class_emb: torch.Tensor,
                        classes: list[str], label_set_id: str, params: dict[str, Any], basis_ref: str | None,
                        inline: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
        """``inline``: (pixels, labels) already decoded; else the world task or dataset ``source``."""
        info, basis = await self.io.run(self.basis, basis_ref)
        if inline is not None:
            s_pix, s_lab, e_pix, e_lab, split = inline[0], inline[1], None, None, ""
        else:
            assert source is not None
            s_pix, s_lab, e_pix, e_lab, split = await self.io.run(sources.alignment_data, source, self.bb,
                                                                   self.artifacts.datasets_dir)
        s_units = await self.units(s_pix)
        e_units = await self.units(e_pix) if e_pix is not None else None
        return await self.io.run(alignment_report, s_units, s_lab, e_units, e_lab, class_emb, self.bb, classes,
                                 label_set_id, sources.source_name(source), params, split, basis, info.ref(),
                                 self.model.name)


_NO_SAMPLE = ("the images behind this basis are not in the artifact store (it was built elsewhere), so there is no "
              "sample for TwoNN and head descriptions; build the basis with POST /bases on an uploaded dataset")
