"""ResiDual: exact residual decomposition of CLIP ViTs, per-unit spectra, and coefficient sets (lambdas).

A pure-torch library (torch, numpy, safetensors, open_clip, schedulefree); it never imports web or queue
packages. Entry points: :func:`load_backbone`, :func:`decompose`, :func:`fit_basis`, :func:`fit`.

Example:
    >>> import torch
    >>> from residual import load_backbone, decompose
    >>> bb = load_backbone("residual-tiny")
    >>> dec = decompose(bb, torch.randn(1, 3, 48, 48))
    >>> dec.units.shape  # (n, U, d): emb, 6 MLPs, 24 heads
    torch.Size([1, 31, 128])
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so `residual --help` and
# `import residual.tiny.tasks` start without loading torch; `from residual import X` works as usual.
_EXPORTS: dict[str, str] = {
    "DEFAULT_TEMPLATES": "residual.classifier",
    "EMBEDDED_MODELS": "residual.backbone",
    "LOGIT_CONVENTION": "residual.classifier",
    "PCA": "residual.spectral",
    "VARIANTS": "residual.coefficients",
    "VARIANT_INFO": "residual.coefficients",
    "ArtifactError": "residual.errors",
    "Backbone": "residual.backbone",
    "Basis": "residual.basis",
    "BasisMismatchError": "residual.errors",
    "CoefficientSet": "residual.coefficients",
    "CoefficientShapeError": "residual.errors",
    "Decomposition": "residual.decomposition",
    "FitCancelledError": "residual.fitting",
    "FitConfig": "residual.fitting",
    "FitError": "residual.errors",
    "FitResult": "residual.fitting",
    "FusedAdapter": "residual.coefficients",
    "Geometry": "residual.backbone",
    "LinearisedLN": "residual.decomposition",
    "NonFiniteCoefficientsError": "residual.errors",
    "RawFeatures": "residual.decomposition",
    "ResidualError": "residual.errors",
    "ResolvedAdapter": "residual.coefficients",
    "StreamingPCA": "residual.spectral",
    "Unit": "residual.decomposition",
    "UnsupportedModelError": "residual.errors",
    "VariantInfo": "residual.coefficients",
    "WeightsError": "residual.errors",
    "adapted_units": "residual.coefficients",
    "apply_fused": "residual.coefficients",
    "apply_many": "residual.coefficients",
    "class_embeddings": "residual.classifier",
    "decompose": "residual.decomposition",
    "explain_logits": "residual.classifier",
    "extract": "residual.decomposition",
    "extract_batched": "residual.decomposition",
    "fit": "residual.fitting",
    "fit_basis": "residual.basis",
    "basis_similarity": "residual.basis",
    "fuse": "residual.coefficients",
    "init_coefficients": "residual.coefficients",
    "k_at": "residual.spectral",
    "load_backbone": "residual.backbone",
    "participation_ratio": "residual.spectral",
    "project_units": "residual.decomposition",
    "resolve": "residual.coefficients",
    "spectral_cosine": "residual.spectral",
    "stratified_split": "residual.fitting",
    "twonn": "residual.spectral",
    "unit_table": "residual.decomposition",
    "wrap_model": "residual.backbone",
    "zero_shot_logits": "residual.classifier",
}

if TYPE_CHECKING:  # the real imports, for type checkers
    from residual.backbone import EMBEDDED_MODELS, Backbone, Geometry, load_backbone, wrap_model
    from residual.basis import Basis, basis_similarity, fit_basis
    from residual.classifier import (
        DEFAULT_TEMPLATES,
        LOGIT_CONVENTION,
        class_embeddings,
        explain_logits,
        zero_shot_logits,
    )
    from residual.coefficients import (
        VARIANT_INFO,
        VARIANTS,
        CoefficientSet,
        FusedAdapter,
        ResolvedAdapter,
        VariantInfo,
        adapted_units,
        apply_fused,
        apply_many,
        fuse,
        init_coefficients,
        resolve,
    )
    from residual.decomposition import (
        Decomposition,
        LinearisedLN,
        RawFeatures,
        Unit,
        decompose,
        extract,
        extract_batched,
        project_units,
        unit_table,
    )
    from residual.errors import (
        ArtifactError,
        BasisMismatchError,
        CoefficientShapeError,
        FitError,
        NonFiniteCoefficientsError,
        ResidualError,
        UnsupportedModelError,
        WeightsError,
    )
    from residual.fitting import FitCancelledError, FitConfig, FitResult, fit, stratified_split
    from residual.spectral import PCA, StreamingPCA, k_at, participation_ratio, spectral_cosine, twonn


__all__ = [
    "DEFAULT_TEMPLATES",
    "EMBEDDED_MODELS",
    "LOGIT_CONVENTION",
    "PCA",
    "VARIANTS",
    "VARIANT_INFO",
    "ArtifactError",
    "Backbone",
    "Basis",
    "BasisMismatchError",
    "CoefficientSet",
    "CoefficientShapeError",
    "Decomposition",
    "FitCancelledError",
    "FitConfig",
    "FitError",
    "FitResult",
    "FusedAdapter",
    "Geometry",
    "LinearisedLN",
    "NonFiniteCoefficientsError",
    "RawFeatures",
    "ResidualError",
    "ResolvedAdapter",
    "StreamingPCA",
    "Unit",
    "UnsupportedModelError",
    "VariantInfo",
    "WeightsError",
    "adapted_units",
    "apply_fused",
    "apply_many",
    "basis_similarity",
    "class_embeddings",
    "decompose",
    "explain_logits",
    "extract",
    "extract_batched",
    "fit",
    "fit_basis",
    "fuse",
    "init_coefficients",
    "k_at",
    "load_backbone",
    "participation_ratio",
    "project_units",
    "resolve",
    "spectral_cosine",
    "stratified_split",
    "twonn",
    "unit_table",
    "wrap_model",
    "zero_shot_logits",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'residual' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)  # noqa: B009 - the name is data here
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
