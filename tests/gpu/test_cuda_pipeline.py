"""The CUDA serving path (run by bench/device_serving.sh on a GPU machine; deselected elsewhere by the gpu marker).

nvJPEG batch decode + tensor resize on the GPU against open_clip's PIL preprocess: a stated pixel bound and the same
top-1 on world test sets; what nvJPEG refuses falls back; the bf16 forward of pixels that never left the GPU.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from residual import extract, load_backbone, zero_shot_logits
from residual.classifier import class_embeddings
from residual.tiny import tasks
from service.engine.pipeline import ImagePipeline
from service.engine.pools import Pool
from service.errors import UnsupportedMedia
from service.images import decode_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the lent GPU machine)")


def _jpeg(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_nvjpeg_pipeline_against_pil() -> None:
    """Stated bound: at most 8 levels of 255 on any pixel, 0.5 on average (nvJPEG's IDCT plus the resize)."""
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-16", pretrained="random", device="cuda")
    pool = Pool(4, "decode-gpu")
    pipe = ImagePipeline(bb, pool, 4, 40_000_000, "auto")
    assert pipe.kind == "tensor"
    blobs = [_jpeg(_photo(h, w, i)) for i, (h, w) in enumerate([(300, 400), (500, 333), (224, 224), (640, 480)])]
    blobs.append(_jpeg(_photo(256, 256, 9), progressive=True))  # falls back to Pillow
    out = asyncio.run(pipe(blobs))
    assert out.device.type == "cuda"
    ref = torch.stack([bb.preprocess(decode_image(b, 40_000_000, i)) for i, b in enumerate(blobs)]).cuda()
    std = torch.tensor(bb.visual.preprocess_cfg["std"], device="cuda")[None, :, None, None]
    diff = ((out - ref) * std * 255).abs()
    assert float(diff.max()) <= 8 and float(diff.mean()) <= 0.5, (float(diff.max()), float(diff.mean()))
    with pytest.raises(UnsupportedMedia):
        asyncio.run(pipe([blobs[0], blobs[1][:100]]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raw, emb = extract(bb, out)
    assert emb.shape == (len(blobs), bb.geometry.out_dim) and torch.isfinite(emb).all()
    pool.stop()


def test_same_top1_on_world_test_sets_on_cuda() -> None:
    bb = load_backbone("residual-tiny", device="cuda")
    pool = Pool(4, "decode-gpu")
    pil = ImagePipeline(bb, pool, 4, 40_000_000, "pil")
    gpu = ImagePipeline(bb, pool, 4, 40_000_000, "tensor")
    for task in ("shape", "colour", "position"):
        t = tasks.TASKS[task]
        images, labels, _ = tasks.task_images(task, "test", n=300)
        blobs = [_jpeg(np.asarray(Image.fromarray(a).resize((96, 96), Image.BICUBIC))) for a in images]
        cls = class_embeddings(bb.encode_text, bb.tokenizer, list(t.classes), list(t.templates), device="cuda")
        preds = [zero_shot_logits(bb.encode_image(asyncio.run(p(blobs)).cuda()).float(), cls.cuda(),
                                  bb.logit_scale.cuda()).argmax(-1).cpu() for p in (pil, gpu)]
        agree = float((preds[0] == preds[1]).float().mean())
        acc = [float((p.numpy() == labels).mean()) for p in preds]
        assert agree >= 0.98 and abs(acc[0] - acc[1]) <= 0.01, (task, agree, acc)
    pool.stop()
