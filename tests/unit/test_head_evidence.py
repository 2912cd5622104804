"""Head specialisation is real on the shipped embedded model (the head-spectrum issue's evidence).

Scores on val images, ablation on test images of the benchmark tasks; the same computation as
``bench/heads.py`` at smaller sizes.
"""

from __future__ import annotations

import pytest
import torch

from residual import LinearisedLN, class_embeddings, extract_batched, project_units
from residual.dictionary import load_dictionary
from residual.heads import describe_head, head_alignment
from residual.tiny import tasks, world
from residual.tiny.reference import reference_images

N_SCORE, N_EVAL = 300, 500


@pytest.fixture(scope="module")
def reports(tiny) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    ln = LinearisedLN(tiny)
    g = tiny.geometry

    def units(images) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return project_units(extract_batched(tiny, tiny.pixels_from_arrays(images))[0], ln)

    out = {}
    for name, task in tasks.TASKS.items():
        s_img, s_lab, _ = tasks.task_images(name, "val", n=N_SCORE)
        e_img, e_lab, _ = tasks.task_images(name, "test", n=N_EVAL)
        cls = class_embeddings(tiny.encode_text, tiny.tokenizer, task.classes, task.templates)
        out[name] = head_alignment(units(s_img), torch.from_numpy(s_lab), cls, tiny.logit_scale, g.layers, g.heads,
                                   units(e_img), torch.from_numpy(e_lab), fractions=(0.10,), seeds=10, top=3)
    return out


def test_colour_and_position_are_carried_by_different_heads(reports: dict[str, dict]) -> None:
    top = {t: {(h["layer"], h["head"]) for h in reports[t]["top_heads"]["text_correlation"]}
           for t in ("colour", "position")}
    assert top["colour"] != top["position"]


def test_top_heads_by_text_alignment_beat_random_heads_on_four_tasks(reports: dict[str, dict]) -> None:
    wins = [t for t, r in reports.items() if r["ablation"]["text_correlation"][0] > r["ablation"]["random"][0]]
    assert len(wins) >= 4, {t: (r["ablation"]["text_correlation"][0], r["ablation"]["random"][0])
                            for t, r in reports.items()}


def test_the_best_colour_head_is_described_with_colours(tiny, reports: dict[str, dict]) -> None:  # type: ignore[no-untyped-def]
    g = tiny.geometry
    best = reports["colour"]["top_heads"]["text_correlation"][0]
    unit = g.head_unit(best["layer"], best["head"])
    ln = LinearisedLN(tiny)
    sample = project_units(extract_batched(tiny, tiny.pixels_from_arrays(reference_images(500)))[0], ln)
    texts = load_dictionary()
    dic = class_embeddings(tiny.encode_text, tiny.tokenizer, texts, ["{}"])
    described = [d["text"] for d in describe_head(sample[:, unit], dic, k=5).named(texts)]
    colour_words = set(world.COLOURS) | set(world.BACKGROUNDS)
    assert any(any(w in text.split() for w in colour_words) for text in described), described
