"""Per-unit drift of live traffic (API key): ``GET /drift`` and ``GET /drift.png`` (docs/method.md §5.6).

Which part of the model no longer sees what it was adapted for: every unit's share of traffic energy outside the
reference subspace, its mean shift in units of the reference's standard deviation, and a score that combines them,
summed over every replica that shares the Redis (``service.engine.drift``). Heads carry their text description.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from residual.decomposition import unit_table
from residual.drift import deployment_score, drift_scores
from residual.plots import head_heatmap_png
from service.api.auth import ApiKey
from service.api.deps import ModelQuery, Ready, ReadyDep
from service.api.schemas import COEFFICIENT_REF, DriftReport
from service.engine.drift import Tracked, coefficients_reference
from service.errors import Conflict, NotReady

router = APIRouter(tags=["drift"])

_WINDOW = Query("recent", description="'recent': the last RESIDUAL_DRIFT_WINDOW images of each replica; 'all': "
                                      "since the reference was first tracked")
_COEFFICIENTS = Query(None, pattern=COEFFICIENT_REF, description="compare with the data this coefficient set was "
                                                                "fitted on (in its basis); default: the model's "
                                                                "default basis")
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model or coefficient set"},
    409: {"description": "no basis for the model yet (build one with POST /bases), or a set of another model"},
    503: {"description": "drift is off (RESIDUAL_DRIFT=off), or the service is not ready"}}


async def _tracked(rt: Ready, coefficients: str | None) -> Tracked:
    drift = rt.engine.drift
    if drift is None:
        raise NotReady("drift statistics are off on this deployment (RESIDUAL_DRIFT=off)")
    if coefficients is None:
        tracked = await rt.io.run(drift.track_default)
        if tracked is None:
            raise Conflict(f"model {rt.model.name} has no basis to measure drift in yet: build one with POST /bases")
        return tracked
    loaded = await rt.io.run(rt.coefficients.resolve, coefficients)
    return await rt.io.run(drift.track, f"coefficients:{loaded.ref}",
                           lambda: coefficients_reference(loaded, rt.artifacts))


async def _report(rt: Ready, coefficients: str | None, window: str, describe: int) -> dict[str, Any]:
    tracked = await _tracked(rt, coefficients)
    drift = rt.engine.drift
    assert drift is not None  # _tracked refused otherwise
    await rt.io.run(drift.settle)  # the batches this replica has served so far are counted,
    await rt.io.run(drift.flush)  # its sums written, then everyone's read
    stats, replicas, note = await rt.io.run(drift.deployment, tracked, window)
    scores = drift_scores(stats, tracked.reference)
    g = rt.model.backbone.geometry
    names = [u.name for u in unit_table(g)]
    order = scores["score"].argsort(descending=True).tolist()
    units = []
    for rank, u in enumerate(order):
        row: dict[str, Any] = {"unit": names[u], "score": round(float(scores["score"][u]), 6),
                               "energy_outside": round(float(scores["energy_outside"][u]), 6),
                               "mean_shift": round(float(scores["mean_shift"][u]), 6), "description": None}
        if rank < describe and ".H" in names[u] and stats.n > 0:
            layer, head = divmod(u - 1 - g.layers, g.heads)
            try:
                detail = await rt.heads.head_detail(layer, head, 3, 0, 1, "somp", None)
                row["description"] = [t["text"] for t in (detail.get("description") or {}).get("texts", [])]
            except Conflict:
                pass
        units.append(row)
    return {"model": rt.model.name, "basis": tracked.basis_ref, "against": tracked.against,
            "coefficients": coefficients and tracked.key.removeprefix("coefficients:"), "window": window,
            "n_images": stats.n, "replicas": replicas, "since": tracked.since,
            "score": round(deployment_score(scores["score"]), 6) if stats.n else 0.0, "units": units, "note": note}


@router.get("/drift", response_model=DriftReport, dependencies=[ApiKey], responses=_ERRORS,
            summary="Per-unit drift of live traffic against the reference basis or a coefficient set's data")
async def drift(rt: ReadyDep, coefficients: str | None = _COEFFICIENTS,
                window: Literal["recent", "all"] = _WINDOW,
                describe: int = Query(5, ge=0, le=50, description="heads (of the most drifted) given their text "
                                                                  "description"),
                model: str | None = ModelQuery) -> dict[str, Any]:
    """Units sorted by ``score`` (0 without drift; 1: the traffic's mean displaced by one reference standard
    deviation on every kept component, or twice the reference's share of energy outside its subspace).
    ``energy_outside``: the share of the traffic's (centred) energy outside the unit's top-k subspace (k at 0.9);
    ``mean_shift``: the RMS over those components of the mean's displacement in standard deviations. ``score`` at
    the top is the deployment's: the mean of the top tenth of the unit scores. Without ``coefficients`` the
    reference is the default basis's own data; with it, the statistics of the set's training images (``against``:
    "training data") when its fit stored them. ``n_images`` and ``replicas`` say what the figures cover."""
    rt = await rt.use(model)
    return await _report(rt, coefficients, window, describe)


@router.get("/drift.png", dependencies=[ApiKey], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "a PNG picture"}, **_ERRORS},
            summary="Layer x head heatmap of drift scores")
async def drift_png(rt: ReadyDep, coefficients: str | None = _COEFFICIENTS,
                    window: Literal["recent", "all"] = _WINDOW, model: str | None = ModelQuery) -> Response:
    rt = await rt.use(model)
    report = await _report(rt, coefficients, window, 0)
    g = rt.model.backbone.geometry
    by_unit = {u["unit"]: u["score"] for u in report["units"]}
    matrix = [[by_unit[f"L{layer}.H{head}"] for head in range(g.heads)] for layer in range(g.layers)]
    title = f"{report['model']}: drift per head ({report['n_images']} images, {window})"
    png = await rt.analysis.run(head_heatmap_png, matrix, title, "drift score")
    return Response(png, media_type="image/png")
