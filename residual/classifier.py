"""Zero-shot classifier from text prompts, with one pinned logit convention (docs/method.md §4.1, §D4).

Class embeddings: encode every template filled with the class name, L2-normalise each template embedding,
average over templates, L2-normalise again. Logits: ``exp(logit_scale) * cos(image, class)``, i.e. the image
embedding is L2-normalised too (the HEAD convention of the reference code). Coefficient sets fitted under
this convention record it in their metadata (:data:`LOGIT_CONVENTION`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_TEMPLATES", "LOGIT_CONVENTION", "class_embeddings", "explain_logits", "fill_templates",
           "zero_shot_logits"]

LOGIT_CONVENTION = "scaled_cosine"  # logits = exp(logit_scale) * cos(y, w_c)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
"""The prompt templates of a label set that names none: the CLI, the service and the client use these same four."""


def fill_templates(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: prompt ``c * len(templates) + t`` is ``templates[t]`` filled with ``classes[c]``."""
    return [t.replace("{}", c) for c in classes for t in templates]


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embedding matrix (C, d), unit-norm rows, from the text tower ``encode_text``."""
    prompts = fill_templates(classes, templates)
    chunks = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        chunks.append(encode_text(tokens).float())
    return prompt_embeddings_to_classes(torch.cat(chunks), len(classes), len(templates))


def prompt_embeddings_to_classes(prompt_emb: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C*T, d) raw prompt embeddings, class-major -> (C, d) unit-norm class embeddings."""
    emb = F.normalize(prompt_emb.float(), dim=-1)
    emb = emb.view(n_classes, n_templates, -1).mean(dim=1)  # (C*T, d) -> (C, T, d) -> (C, d)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(
    image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(n, d) image embeddings, (C, d) unit-norm class embeddings -> (n, C) logits (:data:`LOGIT_CONVENTION`).

    ``logit_scale`` is the model's *log* scale parameter.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale).exp()
    return scale.to(image_emb.dtype) * F.normalize(image_emb, dim=-1) @ class_emb.to(image_emb.dtype).T


def explain_logits(unit_outputs: torch.Tensor, class_emb: torch.Tensor, logit_scale: torch.Tensor | float
                   ) -> torch.Tensor:
    """(n, U, d) per-unit shares of the image embedding -> (n, U, C) exact contributions to the logits.

    logit_c = exp(logit_scale) * <y, w_c> / |y| with y = sum_u y_u, so unit u contributes
    exp(logit_scale) * <y_u, w_c> / |y| and the contributions sum over u to :func:`zero_shot_logits` of y.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale).exp()
    y = unit_outputs.sum(1)  # (n, U, d) -> (n, d)
    norm = y.norm(dim=-1).clamp_min(1e-12)  # (n,)
    # (n, U, d) x (C, d) -> (n, U, C), scaled per image by exp(scale) / |y|
    contrib = torch.einsum("nud,cd->nuc", unit_outputs, class_emb.to(unit_outputs.dtype))
    return contrib * (scale.to(unit_outputs.dtype) / norm)[:, None, None]
