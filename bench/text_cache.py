"""Label-set latency: cold (text encoder) vs warm in process (LRU) vs a Redis hit (a fresh replica's view).

For label sets of 10, 100 and 1000 classes (4 templates each, class names made unique per run so the first call
is really cold), the service's own ``TextCache`` against a real Redis (``RESIDUAL_REDIS_URL``, default
127.0.0.1:6379):

- ``cold``: nothing cached, every prompt goes through the text tower;
- ``memory``: the same cache instance again (in-process LRU);
- ``redis``: a new cache instance with an empty LRU, as on another replica or after a restart.

    python bench/text_cache.py --json bench/out/text_cache.json
    python bench/text_cache.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path

import torch

from residual import DEFAULT_TEMPLATES, load_backbone
from service.engine.text_cache import RedisState, TextCache
from service.metrics import Metrics
from service.stores.label_sets import label_set_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--repeats", type=int, default=5, help="timed warm lookups (median)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = "10,50", 2
    torch.set_num_threads(2)
    url = os.environ.get("RESIDUAL_REDIS_URL", "redis://127.0.0.1:6379/0")
    bb = load_backbone("residual-tiny", device="cpu")
    forwards = {"prompts": 0}

    def encode(prompts: list[str]) -> torch.Tensor:
        forwards["prompts"] += len(prompts)
        return torch.cat([bb.encode_text(bb.tokenizer(prompts[i : i + 256])).float()
                          for i in range(0, len(prompts), 256)])

    metrics = Metrics()
    state = RedisState(url, 1.0, 2.0, metrics)
    if not state.ping():
        raise SystemExit(f"no Redis answers at {url}; set RESIDUAL_REDIS_URL")
    nonce = uuid.uuid4().hex[:8]
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        classes = [f"object {i} {nonce}-{n}" for i in range(n)]  # unique per size: nothing cached
        templates = list(DEFAULT_TEMPLATES)
        ident = label_set_id(bb.weights_id, classes, templates)
        first = TextCache(bb.weights_id, encode, state, 3600, 16, metrics.for_model(bb.name))
        before = forwards["prompts"]
        t0 = time.perf_counter()
        cold = first.class_embeddings(ident, classes, templates)
        cold_s = time.perf_counter() - t0
        encoded = forwards["prompts"] - before
        mem, red = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            first.class_embeddings(ident, classes, templates)
            mem.append(time.perf_counter() - t0)
            replica = TextCache(bb.weights_id, encode, state, 3600, 16, metrics.for_model(bb.name))
            t0 = time.perf_counter()
            hit = replica.class_embeddings(ident, classes, templates)
            red.append(time.perf_counter() - t0)
        assert forwards["prompts"] - before == encoded, "a warm lookup ran the text encoder"
        torch.testing.assert_close(hit, cold)
        row = {"classes": n, "prompts_encoded_cold": encoded, "cold_ms": 1000 * cold_s,
               "memory_ms": 1000 * statistics.median(mem), "redis_ms": 1000 * statistics.median(red)}
        row["cold_vs_redis"] = row["cold_ms"] / row["redis_ms"]
        rows.append(row)
        print(f"{n:>5} classes: cold {row['cold_ms']:9.2f} ms ({encoded} prompts) | memory {row['memory_ms']:7.3f} ms"
              f" | redis {row['redis_ms']:7.2f} ms | cold/redis x{row['cold_vs_redis']:.0f}", flush=True)
    state.client.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"redis": url.split("@")[-1], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
