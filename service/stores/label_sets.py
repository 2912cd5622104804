"""Label sets: content-addressed (classes, templates) of one model's weights, in the artifact store.

The id is ``ls-`` and 20 hex digits of the sha256 of the weights id, the classes and the templates, so the same
label set has the same id on every replica, and a label set of other weights has another id.
"""

from __future__ import annotations

import hashlib
import json

from service.stores.artifacts import ArtifactStore

__all__ = ["LabelSetStore", "label_set_id"]


def label_set_id(weights_id: str, classes: list[str], templates: list[str]) -> str:
    """Content hash of the model weights id, the classes and the templates."""
    blob = json.dumps([weights_id, classes, templates], ensure_ascii=False, separators=(",", ":"))
    return "ls-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


class LabelSetStore:
    """The label sets of the served weights (blocking: file I/O)."""

    def __init__(self, artifacts: ArtifactStore, weights_id: str) -> None:
        self.artifacts = artifacts
        self.weights_id = weights_id

    def id_of(self, classes: list[str], templates: list[str]) -> str:
        return label_set_id(self.weights_id, classes, templates)

    def register(self, classes: list[str], templates: list[str]) -> str:
        ident = self.id_of(classes, templates)
        self.artifacts.write_label_set(ident, classes, templates)
        return ident

    def get(self, ident: str) -> tuple[list[str], list[str]]:
        return self.artifacts.read_label_set(ident)
