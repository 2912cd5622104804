"""Write the model card of the shipped ``residual-tiny`` weights (JSON for tests, Markdown for people).

    python -m residual.tiny.card [--accuracy bench/out/accuracy.json]

The card records the weights' content hash (``weights_id``) and file hash, the config, the training record
written by ``residual.tiny.train``, the zero-shot accuracy per task on the first ``CARD_TEST_SIZE`` test images
(what ``tests/unit/test_tiny_model.py`` recomputes), and, when given, the full accuracy table of
``bench/accuracy.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from residual.backbone import EMBEDDED_MODELS, Backbone, load_backbone
from residual.classifier import class_embeddings, zero_shot_logits
from residual.tiny import tasks
from residual.tiny.reference import reference_source, shipped_basis_path

__all__ = ["CARD_TEST_SIZE", "card_zero_shot", "main"]

CARD_TEST_SIZE = 200


def card_zero_shot(bb: Backbone, n: int = CARD_TEST_SIZE) -> dict[str, float]:
    """Zero-shot accuracy per task on the first ``n`` images of the test split."""
    out = {}
    for name, task in tasks.TASKS.items():
        images, labels, _ = tasks.task_images(name, "test", n=n, side=bb.geometry.image_size)
        cls = class_embeddings(bb.encode_text, bb.tokenizer, task.classes, task.templates)
        emb = bb.encode_image(bb.pixels_from_arrays(images)).float()
        pred = zero_shot_logits(emb, cls, bb.logit_scale).argmax(-1).cpu()
        out[name] = float((pred == torch.from_numpy(labels)).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", type=Path, default=None, help="JSON written by bench/accuracy.py")
    args = p.parse_args(argv)
    weights = EMBEDDED_MODELS["residual-tiny"]
    bb = load_backbone("residual-tiny", device="cpu")
    record: dict[str, Any] = json.loads(weights.with_suffix(".train.json").read_text())
    config = json.loads((Path(__file__).resolve().parents[1] / "model_configs" / "residual-tiny.json").read_text())
    card: dict[str, Any] = {
        "model": "residual-tiny",
        "weights_id": bb.weights_id,
        "file_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "file_bytes": weights.stat().st_size,
        "storage_dtype": "float16",
        "config": config,
        "training": {k: record[k] for k in ("config", "wall_time_s", "pairs_seen", "torch", "open_clip")},
        "training_history": record["history"],
        "card_test_size": CARD_TEST_SIZE,
        "zero_shot_card_set": card_zero_shot(bb),
        "reference_basis": {"file": shipped_basis_path().name, "source": reference_source()},
    }
    if args.accuracy is not None:
        card["accuracy_table"] = json.loads(args.accuracy.read_text())
    weights.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")

    cfg = record["config"]
    lines = [
        "# Model card: residual-tiny",
        "",
        "A small CLIP (open_clip `CLIP`, config `residual/model_configs/residual-tiny.json`) trained from scratch by",
        "`python -m residual.tiny.train` with open_clip's contrastive loss on freshly rendered image-caption pairs",
        "of the procedural world (`residual/tiny/world.py`). It exists so the product runs a real CLIP end to end",
        "with no model hub; it is a laboratory model, not a general-purpose one.",
        "",
        f"- weights: `residual-tiny.safetensors`, float16, {card['file_bytes'] / 1e6:.1f} MB,"
        f" weights id `{card['weights_id']}`, file sha256 `{card['file_sha256'][:16]}…`",
        f"- vision tower: {config['vision_cfg']['layers']} layers, width {config['vision_cfg']['width']},"
        f" {config['vision_cfg']['width'] // config['vision_cfg']['head_width']} heads of"
        f" {config['vision_cfg']['head_width']}, {config['vision_cfg']['image_size']} px images, patch"
        f" {config['vision_cfg']['patch_size']}, {config['vision_cfg'].get('pos_embed_type', 'learnable')} position"
        f" embedding; text tower: {config['text_cfg']['layers']} layers, width"
        f" {config['text_cfg']['width']}, context {config['text_cfg']['context_length']}; embedding"
        f" {config['embed_dim']}",
        f"- training: {cfg['steps']} steps of {cfg['batch_size']} pairs ({record['pairs_seen']:,} pairs), AdamW lr"
        f" {cfg['lr']} (warm-up {cfg['warmup']}, cosine), weight decay {cfg['weight_decay']}, seed {cfg['seed']},"
        + (" bfloat16 autocast," if cfg.get("amp") else "")
        + f" {record['wall_time_s'] / 60:.1f} min on 2 CPU cores ({record['pairs_seen'] / record['wall_time_s']:.0f}"
        f" pairs/s; torch {record['torch']}, open_clip"
        f" {record['open_clip']})",
        f"- batches: groups of {cfg['group']} images; most are minimal pairs that differ only in shape, digit,"
        " position, count" + (", size or background texture" if cfg.get("texture_pairs") else " or size")
        + " (`residual/tiny/train.py`), the rest share background, texture and colour"
        + (f"; a minimal pair's caption names only its attribute with probability {cfg['focus']} at the start,"
           f" falling to 0 at {cfg['focus_until']:.0%} of the steps" if cfg.get("focus") else ""),
        "- data: outlined shapes and digit glyphs on textured backgrounds; captions name random subsets of shape,"
        " colour, size, position, background colour and texture, digit and object count in varied phrasings;"
        " zero-shot templates (`residual/tiny/tasks.py`) are not caption phrasings",
        f"- reference basis: `{shipped_basis_path().name}`, per-unit PCA on {reference_source()['n']} world images"
        f" (training mixture, seed {reference_source()['seed']})",
        "",
        f"## Zero-shot accuracy on the first {CARD_TEST_SIZE} test images of each task",
        "",
        "| task | " + " | ".join(card["zero_shot_card_set"]) + " |",
        "|---|" + "---|" * len(card["zero_shot_card_set"]),
        "| zero-shot | " + " | ".join(f"{v:.3f}" for v in card["zero_shot_card_set"].values()) + " |",
        "",
    ]
    if args.accuracy is not None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
        from accuracy import markdown  # type: ignore[import-not-found]

        lines += ["## Accuracy table (`python bench/accuracy.py`; full test splits of 1000 images)", "",
                  markdown(card["accuracy_table"])]
    lines += [
        "## Known limitations",
        "",
        "Zero-shot count, position and size lag their linear probes (the text side learns those phrasings later",
        "than the image side): that is the room ResiDual recovers in the table. Digit has the lowest linear probe",
        "of the eight tasks; which glyphs it misses has not been analysed.",
        "",
        "## How it got here (measured on these machines)",
        "",
        "- Supervised on shape alone, a ViT of this geometry is still near chance after 300 steps of 128 images",
        "  when objects have no outline (0.24), and reaches 0.85 in those 300 steps with the contrasting outline",
        "  the world now draws (`bench/tiny_supervised_shape.py --outline 0` against the default): without",
        "  outlines a shape's edges change polarity with its colour and the background, which the patch embedding",
        "  must first learn to ignore. The first shipped model (no outlines, no focused captions, float32,",
        "  1,100 steps) had zero-shot shape 0.16, digit 0.08, count 0.24 and probes of 0.19, 0.12 and 0.33.",
        "- Fixed 2-D sin-cos position embeddings: a supervised ViT learns position in 75 steps with them (74 %",
        "  against 22 % with learned ones).",
        "- Background-texture minimal-pair groups (`texture_pairs` 0.15 of the groups). Without them every",
        "  hard-negative group shares its texture, so texture never has to be read to match captions inside a",
        "  group: the previous model, same recipe otherwise, had texture zero-shot 0.33 and probe 0.735; with",
        "  them 0.87 and 0.998 (table above).",
        "- bfloat16 autocast makes a step about 1.5x faster on these CPUs: 2,200 steps took 47.8 minutes at",
        "  196 pairs/s (the previous model). The shipped run took longer (wall time above) because the machine",
        "  ran at 117 pairs/s that day; 30-step runs of both recipes, one after the other that day, measured",
        "  the same rate (104 and 103 pairs/s), so the texture groups cost nothing.",
        "",
    ]
    weights.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
