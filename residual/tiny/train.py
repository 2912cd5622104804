"""Train the embedded ``residual-tiny`` CLIP from scratch on the procedural world.

    python -m residual.tiny.train --out residual/weights/residual-tiny.safetensors

The model is created by open_clip's own factory from ``residual/model_configs/residual-tiny.json`` and trained
with open_clip's contrastive loss (``ClipLoss``) on freshly rendered image-caption pairs (no pair is seen
twice). Progress (loss, pairs per second, periodic zero-shot accuracy per task) goes to stderr; the final
weights are written as float16 safetensors together with a JSON training record next to them.

What makes a CPU budget enough (each measured here, see the model card): batches of minimal-pair groups (hard
negatives that differ in one attribute), captions that in the first part of training name only that attribute
(``focus``), outlined objects and glyphs in the world (colour-invariant edges), and bfloat16 autocast (about
1.5x faster steps on these CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

from residual.classifier import class_embeddings, zero_shot_logits
from residual.tiny import tasks, world

logger = logging.getLogger(__name__)

MODEL_NAME = "residual-tiny"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2200  # optimiser steps (the shipped weights)
    batch_size: int = 256  # image-caption pairs per step
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.1  # on matrices only (not gains, biases, embeddings or logit_scale)
    seed: int = 0  # seeds the model init and the world stream
    eval_every: int = 200  # steps between zero-shot evaluations (0: never)
    eval_images: int = 160  # test images per task in each evaluation
    threads: int = 2  # torch intra-op threads
    group: int = 8  # images per hard-negative group (same background, texture and colour); 1 = no groups
    loader_workers: int = 1  # processes rendering batches ahead of the optimiser (0 = render inline)
    focus: float = 0.5  # chance that a minimal-pair caption names only the group's attribute (at step 0) ...
    focus_until: float = 0.6  # ... falling linearly to 0 at this fraction of the steps
    texture_pairs: float = 0.15  # weight of background-texture minimal-pair groups in a batch (0: none)
    amp: bool = True  # bfloat16 autocast of the forward pass on the CPU; the loss and the weights stay float32


def _pixels(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) normalised float32, identical to open_clip's transform at native size."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)  # (n, S, S, 3) -> (n, 3, S, S)
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


# Hard-negative groups: the images of a group differ only in the named attribute (plus nuisance jitter), and
# their captions always mention it, so matching captions to images inside a group needs exactly that attribute.
_MINIMAL = (
    ("shape", "object", world.SHAPES, 0.35),
    ("digit", "digit", world.DIGITS, 0.2),
    ("position", "object", world.POSITIONS, 0.15),
    ("count", "count", world.COUNTS, 0.1),
    ("size", "object", world.SIZES, 0.05),
)


def _minimal_group(rng: np.random.Generator, attribute: str, kind: str, values: tuple[str, ...]
                   ) -> list[world.Scene]:
    shared: dict[str, str] = {"background": str(rng.choice(list(world.BACKGROUNDS))),
                              "texture": str(rng.choice(world.TEXTURES)),
                              "colour": str(rng.choice(list(world.COLOURS)))}
    if kind == "object":
        shared |= {"shape": str(rng.choice(world.SHAPES)), "size": str(rng.choice(world.SIZES[1:])),
                   "position": str(rng.choice(world.POSITIONS))}
    elif kind == "digit":
        shared |= {"size": str(rng.choice(world.SIZES[1:])), "position": str(rng.choice(world.POSITIONS))}
    shape = str(rng.choice(world.SHAPES))
    scenes = []
    for value in rng.permutation(values):
        fixed = {**shared, attribute: str(value)}
        if kind == "count":
            scene = (world.sample_scene(rng, "object", size="small", shape=shape, **{k: v for k, v in fixed.items()
                                                                                     if k != "count"})
                     if value == "one" else world.sample_scene(rng, "multi", shape=shape, **fixed))
        else:
            scene = world.sample_scene(rng, kind, **fixed)
            if kind == "object" and attribute != "digit":
                scene = dataclasses.replace(scene, digit=None)
        scenes.append(scene)
    return scenes


def make_batch(batch_size: int, group: int, seed: int, side: int, focus: float = 0.0, texture_pairs: float = 0.0
               ) -> tuple[np.ndarray, list[str]]:
    """One training batch, a pure function of ``seed``: (images (B, S, S, 3) uint8, captions).

    Most of the batch comes in minimal-pair groups (see ``_MINIMAL``); the rest in groups of ``group`` random
    scenes that share background colour, texture and object colour. Both are hard negatives: they make the towers
    learn shape, digits, position and count instead of stopping at colour and background.
    """
    rng = np.random.default_rng(seed)
    scenes: list[world.Scene] = []
    musts: list[frozenset[str]] = []
    focused: list[str | None] = []
    minimal = _MINIMAL + ((("texture", "object", world.TEXTURES, texture_pairs),) if texture_pairs > 0 else ())
    probs = np.asarray([m[3] for m in minimal] + [1 - sum(m[3] for m in _MINIMAL)])
    while len(scenes) < batch_size:
        pick = int(rng.choice(len(probs), p=probs / probs.sum()))
        if pick < len(minimal) and group > 1:
            attribute, kind, values, _ = minimal[pick]
            new = _minimal_group(rng, attribute, kind, values)
            must = frozenset({attribute} | ({"shape"} if attribute == "count" else set()))
            only = attribute if rng.random() < focus else None
        else:
            shared = {"background": str(rng.choice(list(world.BACKGROUNDS))),
                      "texture": str(rng.choice(world.TEXTURES)), "colour": str(rng.choice(list(world.COLOURS)))}
            new = [world.sample_scene(rng, **(shared if group > 1 else {})) for _ in range(max(1, group))]
            must, only = frozenset(), None
        take = new[: batch_size - len(scenes)]
        scenes += take
        musts += [must] * len(take)
        focused += [only] * len(take)
    images = world.render_batch(scenes, side=side, seed=int(rng.integers(2**31)))
    return images, [world.focused_caption(s, f, rng) if f else world.caption(s, rng, m)
                    for s, m, f in zip(scenes, musts, focused, strict=True)]


class _Batches(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Batch i is ``make_batch(..., seed=base + i)``, whoever renders it: workers change speed, not data."""

    def __init__(self, cfg: TrainConfig, side: int) -> None:
        self.cfg, self.side = cfg, side

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(wid, self.cfg.steps, n):
            yield make_batch(self.cfg.batch_size, self.cfg.group, self.cfg.seed * 1_000_003 + i, self.side,
                             focus=self.cfg.focus * max(0.0, 1 - i / max(1.0, self.cfg.focus_until * self.cfg.steps)),
                             texture_pairs=self.cfg.texture_pairs)


def evaluate(model: torch.nn.Module, tokenizer, n: int, side: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Zero-shot accuracy per task on the first ``n`` test images."""
    model.eval()
    cfg = model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    out = {}
    with torch.no_grad():
        for name, task in tasks.TASKS.items():
            images, labels, _ = tasks.task_images(name, "test", n=n, side=side)
            cls = class_embeddings(model.encode_text, tokenizer, task.classes, task.templates)
            emb = model.encode_image(_pixels(images, mean, std))
            pred = zero_shot_logits(emb, cls, model.logit_scale).argmax(-1).numpy()
            out[name] = float((pred == labels).mean())
    model.train()
    return out


def train(cfg: TrainConfig, out: Path) -> dict[str, object]:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    open_clip.add_model_config(CONFIG_DIR)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    side = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    pre = model.visual.preprocess_cfg
    mean, std = torch.tensor(pre["mean"]), torch.tensor(pre["std"])

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    batches = torch.utils.data.DataLoader(_Batches(cfg, side), batch_size=None, num_workers=cfg.loader_workers,
                                          prefetch_factor=2 if cfg.loader_workers else None)
    history: list[dict[str, object]] = []
    losses: list[float] = []
    start = time.time()
    model.train()
    for step, (images, captions) in enumerate(batches, start=1):
        lr = cfg.lr * (step / cfg.warmup if step <= cfg.warmup else
                       0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
            img_f, txt_f, scale = model(_pixels(images, mean, std), tokenizer(captions))
        loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 10 == 0 or step == 1:
            el = time.time() - start
            logger.info("step %d/%d loss %.4f lr %.2e %.0f pairs/s elapsed %.0fs", step, cfg.steps, loss.item(), lr,
                        step * cfg.batch_size / el, el)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            acc = evaluate(model, tokenizer, cfg.eval_images, side)
            history.append({"step": step, "loss": float(loss.item()), "zero_shot": acc,
                            "elapsed_s": round(time.time() - start, 1)})
            logger.info("step %d zero-shot %s", step, " ".join(f"{k}={v:.2f}" for k, v in acc.items()))
            _save(model, out)  # a usable checkpoint at every evaluation
    wall = time.time() - start
    _save(model, out)
    record = {"model": MODEL_NAME, "config": asdict(cfg), "wall_time_s": round(wall, 1),
              "pairs_seen": cfg.steps * cfg.batch_size, "history": history, "losses": [round(v, 4) for v in losses],
              "torch": torch.__version__, "open_clip": open_clip.__version__}
    out.with_suffix(".train.json").write_text(json.dumps(record, indent=2))
    return record


def _save(model: torch.nn.Module, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model": MODEL_NAME})
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("residual/weights/residual-tiny.safetensors"))
    for f, default in asdict(TrainConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    train(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
