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

from residual.backbone import EMBEDDED_MODELS, Backbone, Geometry, load_backbone, wrap_model
from residual.basis import Basis, fit_basis
from residual.classifier import LOGIT_CONVENTION, class_embeddings, explain_logits, zero_shot_logits
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
from residual.fit import FitCancelledError, FitConfig, FitResult, fit, stratified_split
from residual.spectral import PCA, StreamingPCA, k_at, participation_ratio, spectral_cosine, twonn

__all__ = [
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
