"""Which served model a set of weights belongs to: coefficient sets, bases and label sets are keyed by a model's
weights id, and using one with another model answers 409 naming the model it belongs to."""

from __future__ import annotations

from collections.abc import Callable

from service.errors import Conflict

__all__ = ["WeightsOwner", "no_owner", "other_model"]

WeightsOwner = Callable[[str], str | None]
"""weights id -> the name of the served model with those weights (None: no served model has them)."""


def no_owner(weights_id: str) -> str | None:
    return None


def other_model(what: str, weights_id: str, owner: WeightsOwner, model: str, served_weights: str) -> Conflict:
    """409 for ``what`` (e.g. "coefficient set 'pets@v-1'") made with ``weights_id`` used on ``model``."""
    name = owner(weights_id)
    if name is not None:
        return Conflict(f"{what} belongs to model {name!r}, not {model!r}: send model={name!r} (its weights are "
                        f"{weights_id})")
    return Conflict(f"{what} belongs to other model weights ({weights_id}), which no served model has; model "
                    f"{model!r} has {served_weights}")
