"""Errors raised by the ``residual`` library.

Hierarchy::

    ResidualError                    base class; catch this to handle any library error
    ├── UnsupportedModelError        the backbone's architecture cannot be decomposed, or the name is unknown
    ├── WeightsError                 a checkpoint is missing, unsafe (pickle with code) or does not fit the model
    ├── ArtifactError                a basis or coefficient-set file is malformed
    │   ├── CoefficientShapeError    tensor names or shapes do not match the unit table / basis
    │   ├── NonFiniteCoefficientsError   NaN or Inf in lambdas or basis tensors
    │   └── BasisMismatchError       a coefficient set refers to another basis or model than the one given
    └── FitError                     fitting cannot run on the given data (too few samples or classes)

Every message says what is wrong and, where it can, what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BasisMismatchError",
    "CoefficientShapeError",
    "FitError",
    "NonFiniteCoefficientsError",
    "ResidualError",
    "UnsupportedModelError",
    "WeightsError",
]


class ResidualError(Exception):
    """Base class of every error raised on purpose by the library."""


class UnsupportedModelError(ResidualError):
    """The model name is unknown or its architecture is not a decomposable open_clip ViT."""


class WeightsError(ResidualError):
    """A weights file cannot be found, is unsafe to load, or does not match the architecture."""


class ArtifactError(ResidualError):
    """A basis or coefficient-set file is malformed or unreadable."""


class CoefficientShapeError(ArtifactError):
    """Tensor names or shapes do not match the expected unit table."""


class NonFiniteCoefficientsError(ArtifactError):
    """A tensor holds NaN or Inf values."""


class BasisMismatchError(ArtifactError):
    """A coefficient set was fitted on another basis or model than the one it is used with."""


class FitError(ResidualError):
    """Fitting cannot run on the given data."""
