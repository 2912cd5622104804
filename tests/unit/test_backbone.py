from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from residual import UnsupportedModelError, WeightsError, load_backbone
from residual.backbone import EMBEDDED_MODELS


def test_unknown_model_name() -> None:
    with pytest.raises(UnsupportedModelError, match="unknown model"):
        load_backbone("no-such-model", device="cpu")


def test_missing_checkpoint() -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("residual-tiny", pretrained="/nonexistent/w.safetensors", device="cpu")


def test_malicious_torch_checkpoint_is_refused(tmp_path) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(WeightsError, match="refusing"):
        load_backbone("residual-tiny", pretrained=path, device="cpu")
    assert not sentinel.exists()


def test_torch_checkpoint_loads_with_weights_only(tmp_path, tiny) -> None:
    path = tmp_path / "w.pt"
    torch.save({k: v.clone() for k, v in tiny.model.state_dict().items()}, path)
    bb = load_backbone("residual-tiny", pretrained=path, device="cpu")
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(bb.encode_image(x), tiny.encode_image(x))


def test_shipped_checkpoint_hash_is_recorded() -> None:
    card = json.loads(Path(EMBEDDED_MODELS["residual-tiny"]).with_suffix(".card.json").read_text())
    assert load_backbone("residual-tiny", device="cpu").weights_id == card["weights_id"]


def test_weights_id_depends_on_content() -> None:
    torch.manual_seed(0)
    a = load_backbone("residual-tiny", pretrained="random", device="cpu")
    torch.manual_seed(1)
    b = load_backbone("residual-tiny", pretrained="random", device="cpu")
    assert a.weights_id != b.weights_id


def test_default_device_and_precision(tiny) -> None:
    assert tiny.device.type == ("cuda" if torch.cuda.is_available() else "cpu") or tiny.device.type == "cpu"
    with pytest.raises(ValueError, match="precision"):
        load_backbone("residual-tiny", precision="int3")


def test_pretrained_tag_resolves_from_the_local_hub_cache(tmp_path) -> None:
    """An open_clip tag loads from a populated local cache with HF_HUB_OFFLINE=1, and fails cleanly otherwise."""
    import open_clip

    cache = tmp_path / "hub"
    with pytest.raises(WeightsError, match="cannot load"):
        load_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu", cache_dir=cache)
    torch.manual_seed(3)
    ref = open_clip.create_model("ViT-B-32").eval()
    snapshot = cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    torch.save(ref.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    bb = load_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu", cache_dir=cache)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x), ref.encode_image(x), rtol=1e-4, atol=1e-5)


def test_native_size_fast_path_equals_preprocess(tiny) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from residual.tiny import tasks

    images, _, _ = tasks.task_images("shape", "test", n=6)
    fast = tiny.pixels_from_arrays(images)
    slow = torch.stack([tiny.preprocess(Image.fromarray(a)) for a in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


def test_pixels_from_arrays_resizes_other_sizes_as_one_batch() -> None:
    """World images (48 px) for a 224-px model: one batched resize, within 2 levels of 255 of open_clip's PIL
    transform image by image; at the native size, exactly the transform."""
    import numpy as np
    from PIL import Image

    from residual.tiny import tasks

    torch.manual_seed(0)
    b16 = load_backbone("ViT-B-16", pretrained="random", device="cpu")
    images = tasks.task_images("shape", "test", n=6)[0]  # (6, 48, 48, 3)
    batched = b16.pixels_from_arrays(images)
    one_by_one = torch.stack([b16.preprocess(Image.fromarray(a)) for a in images])
    std = torch.tensor(b16.visual.preprocess_cfg["std"])[None, :, None, None]
    assert batched.shape == (6, 3, 224, 224)
    assert float(((batched - one_by_one) * std * 255).abs().max()) <= 2.0 + 1e-3
    tiny = load_backbone("residual-tiny", device="cpu")
    assert torch.equal(tiny.pixels_from_arrays(images),
                       torch.stack([tiny.preprocess(Image.fromarray(a)) for a in np.asarray(images)]))
