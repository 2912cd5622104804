"""Label sets: content-addressed (classes, templates) of one model's weights, in the artifact store.

The id is ``ls-`` and 20 hex digits of the sha256 of the weights id, the classes and the templates, so the same
label set has the same id on every replica, and a label set of other weights has another id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from service.stores.artifacts import ArtifactStore
from service.stores.ownership import WeightsOwner, no_owner, other_model

__all__ = ["LabelSetStore", "label_set_id"]


def label_set_id(weights_id: str, classes: list[str], templates: list[str]) -> str:
    """Content hash of the model weights id, the classes and the templates."""
    blob = json.dumps([weights_id, classes, templates], ensure_ascii=False, separators=(",", ":"))
    return "ls-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


class LabelSetStore:
    """The label sets of the served weights (blocking: file I/O)."""

    def __init__(self, artifacts: ArtifactStore, weights_id: str, model: str = "", owner: WeightsOwner = no_owner,
                 known_weights: Callable[[], tuple[str, ...]] = tuple) -> None:
        self.artifacts = artifacts
        self.weights_id = weights_id
        self.model = model
        self.owner = owner
        self.known_weights = known_weights  # the weights of the served models: whose label set is it?

    def id_of(self, classes: list[str], templates: list[str]) -> str:
        return label_set_id(self.weights_id, classes, templates)

    def register(self, classes: list[str], templates: list[str]) -> str:
        ident = self.id_of(classes, templates)
        self.artifacts.write_label_set(ident, classes, templates)
        return ident

    def get(self, ident: str) -> tuple[list[str], list[str]]:
        """(classes, templates) of a label set of this model; 409 naming the model of another's."""
        classes, templates = self.artifacts.read_label_set(ident)
        if self.id_of(classes, templates) != ident:  # the id hashes the weights: recompute it for each served model
            weights = next((w for w in self.known_weights() if label_set_id(w, classes, templates) == ident),
                           "unknown")
            raise other_model(f"label set {ident}", weights, self.owner, self.model, self.weights_id)
        return classes, templates
