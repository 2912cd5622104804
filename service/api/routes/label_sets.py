"""The label-set registry: ``POST /label-sets`` (admin key), ``GET /label-sets/{id}`` (API key), and
``POST /label-sets/diagnose`` (admin key): what a label set will get right and wrong, before a fit.

A label set's id is the content hash of the served weights id, its classes and its templates, so registering is
idempotent and every replica computes the same id (``service.stores.label_sets``).
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Path

from residual import zero_shot_logits
from residual.diagnosis import closest_pairs, confused_pairs, confusion_matrix, head_text_share
from residual.spectral import explained_variance, k_at
from service import sources
from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.convertors import register_segment
from service.api.deps import ModelQuery, Ready, ReadyDep, label_set_from, source_and_label_set, validate_label_set
from service.api.schemas import (
    LABEL_SET_ID,
    DiagnoseRequest,
    LabelSetCreated,
    LabelSetDiagnosis,
    LabelSetOut,
    LabelSetRequest,
)
from service.errors import Conflict, InvalidRequest, PayloadTooLarge

router = APIRouter(tags=["label sets"])


# ``{label_set_id:label_set}``: any path segment but ``diagnose``, so ``/label-sets/diagnose`` is never taken for a
# label-set id (its OPTIONS answers ``Allow: POST``, not ``GET, POST``)
register_segment("label_set", r"(?!diagnose$)[^/]+")

_BODY = JsonBody(LabelSetRequest)


@router.post("/label-sets", response_model=LabelSetCreated, status_code=201, dependencies=[AdminKey],
             openapi_extra=_BODY.openapi, summary="Register a label set",
             responses={404: {"description": "unknown model"},
                        413: {"description": "classes x templates over the prompt limit, or the body over its limit"},
                        415: {"description": "the body is not application/json"},
                        422: {"description": "invalid label set"},
                        507: {"description": "the artifact volume is full"}})
async def create_label_set(rt: ReadyDep, label_set: LabelSetRequest = _BODY.depends) -> LabelSetCreated:
    """The id is a content hash of the model's weights id, the classes and the templates (idempotent): the label
    set belongs to that model."""
    rt = await rt.use(label_set.model)
    classes, templates = validate_label_set(label_set.classes, label_set.templates, rt.settings)
    return LabelSetCreated(model=rt.model.name,
                           label_set_id=await rt.io.run(rt.label_sets.register, classes, templates))


@router.get("/label-sets/{label_set_id:label_set}", response_model=LabelSetOut, dependencies=[ApiKey],
            responses={404: {"description": "unknown label set or model"},
                       409: {"description": "the label set belongs to another model (the message names it)"}},
            summary="Read a registered label set")
async def get_label_set(rt: ReadyDep, label_set_id: str = Path(..., pattern=LABEL_SET_ID),
                        model: str | None = ModelQuery) -> LabelSetOut:
    rt = await rt.use(model)
    classes, templates = await rt.io.run(rt.label_sets.get, label_set_id)
    return LabelSetOut(model=rt.model.name, label_set_id=label_set_id, classes=classes, templates=templates)


# ---- diagnosis ----------------------------------------------------------------------------------------------------

_DIAGNOSE = JsonBody(DiagnoseRequest)


HeadRows = tuple[dict[str, Any] | None, list[dict[str, Any]] | None, str | None]


def _head_rows(rt: Ready, class_emb: torch.Tensor, top: int) -> HeadRows:
    """Blocking: (basis ref, the heads by text share, note) in the model's default basis; no basis: a note."""
    try:
        info, basis = rt.heads.basis(None)
    except Conflict as exc:
        return None, None, f"no head shares: {exc.message}"
    share = head_text_share(basis, class_emb)  # (L*H,)
    g = basis.geometry
    ks = k_at(explained_variance(basis.eigenvalues[g.head_units]), 0.9)
    order = share.argsort(descending=True)[:top].tolist()
    return info.ref(), [{"unit": f"L{h // g.heads}.H{h % g.heads}", "layer": h // g.heads, "head": h % g.heads,
                         "text_share": round(float(share[h]), 6), "k_90": int(ks[h])} for h in order], None


async def _data_rows(rt: Ready, src: sources.WorldTaskSource | sources.DatasetSource, classes: list[str],
                     class_emb: torch.Tensor, top: int) -> dict[str, Any]:
    """Zero-shot on the dataset's images (through the batcher, in chunks): accuracy, per class, confusion."""
    if isinstance(src, sources.DatasetSource):
        n = len((await rt.io.run(rt.datasets.get, src.dataset_id)).files)
        if n > rt.settings.heads_sync_max_images:
            raise PayloadTooLarge(f"the dataset has {n} images; a diagnosis reads at most "
                                  f"{rt.settings.heads_sync_max_images} (RESIDUAL_HEADS_SYNC_MAX_IMAGES)")
    pixels, labels, *_ = await rt.io.run(sources.alignment_data, src, rt.model.backbone, rt.artifacts.datasets_dir)
    chunk = rt.batcher.max_batch
    embs = [(await rt.batcher.submit(pixels[i : i + chunk], traffic=False))[1]  # not traffic: no drift
            for i in range(0, pixels.shape[0], chunk)]

    def score() -> dict[str, Any]:
        emb = torch.cat(embs).float()  # (n, d)
        logits = zero_shot_logits(emb, class_emb.to(emb.device), rt.model.backbone.logit_scale.to(emb.device))
        confusion = confusion_matrix(logits.cpu(), labels, len(classes))  # (C, C)
        per_class = []
        for i, c in enumerate(classes):
            total = int(confusion[i].sum())
            per_class.append({"label": c, "images": total,
                              "accuracy": round(int(confusion[i, i]) / total, 6) if total else None})
        return {"dataset": sources.source_name(src), "images": int(labels.numel()),
                "accuracy": round(float(confusion.diagonal().sum()) / max(1, int(labels.numel())), 6),
                "per_class": per_class, "confusion": confusion.tolist(),
                "confused_pairs": confused_pairs(confusion, classes, top)}

    return await rt.io.run(score)


@router.post("/label-sets/diagnose", response_model=LabelSetDiagnosis, dependencies=[AdminKey],
             openapi_extra=_DIAGNOSE.openapi, summary="Diagnose a label set before a fit",
             responses={404: {"description": "unknown model, label set or dataset"},
                        409: {"description": "the label set belongs to another model"},
                        413: {"description": "the label set's prompts or the dataset over their limits"},
                        415: {"description": "the body is not application/json"},
                        422: {"description": "invalid request"}})
async def diagnose(rt: ReadyDep, body: DiagnoseRequest = _DIAGNOSE.depends) -> dict[str, Any]:
    """Before fitting, what a label set will get right and wrong:

    - ``pairs``: the class pairs whose prompt-averaged text embeddings are closest (highest cosine first): zero-shot
      confuses these first; rename or describe them better (templates) before a fit;
    - ``heads``: for each head, the share of the label set's text directions (the span of the mean-centred class
      embeddings) inside the head's subspace in the model's default basis (k at 0.9): the heads that carry this
      label set, which a coefficient set will amplify;
    - with ``dataset`` (a dataset id, or ``world:<task>``: its val split): zero-shot accuracy, per class, the
      confusion matrix and the most confused pairs on those images.
    """
    rt = await rt.use(body.model)
    src = None
    if body.dataset is not None:
        sizes = {"score": body.images} if body.dataset.startswith("world:") else None
        src, classes, templates = await source_and_label_set(body.dataset, sizes, body.label_set, body.label_set_id,
                                                             rt, "a diagnosis")
    else:
        classes, templates = await label_set_from(body.label_set, body.label_set_id, rt)
        if len(classes) < 2:
            raise InvalidRequest("a diagnosis needs at least two classes")
    ls_id = rt.label_sets.id_of(classes, templates)
    class_emb = await rt.io.run(rt.text.class_embeddings, ls_id, classes, templates)
    pairs = closest_pairs(class_emb, classes, body.top)
    basis, heads, note = await rt.io.run(_head_rows, rt, class_emb, body.top)
    data = await _data_rows(rt, src, classes, class_emb, body.top) if src is not None else None
    return {"model": rt.model.name, "label_set_id": ls_id, "classes": classes, "pairs": pairs, "basis": basis,
            "heads": heads, "note": note, "data": data}
