"""The CPU training step of `clip-pgs bench step`, in PyTorch + open_clip: forward, ClipLoss,
backward, AdamW (open_clip's decay groups), same config, batch size and thread count. Prints one
JSON line: {"name", "threads", "median_s", "samples_per_s", "peak_rss_mb", "peer"}.

Usage: python tools/bench_step_torch.py --config ViT-B-16 --batch 2 --threads 2
(tools/bench_train_step.sh runs it interleaved with ours)
"""
import argparse
import json
import os
import resource
import statistics
import time

import open_clip
import torch

from open_clip_step import CAPTIONS, ROOT, adamw


def bench(config, batch, samples, warmup):
    path = os.path.join(ROOT, "model", "configs", f"{config}.json")
    with open(path) as f:
        cfg = json.load(f)
    open_clip.factory._MODEL_CONFIGS[config] = cfg
    torch.manual_seed(0)
    model = open_clip.create_model(config, pretrained=None).float().train()
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size)
    text = open_clip.get_tokenizer("ViT-B-16")([CAPTIONS[i % 4] for i in range(batch)],
                                               context_length=cfg["text_cfg"].get("context_length", 77))
    loss_fn = open_clip.ClipLoss()
    opt = adamw(model)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images, text))
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"name": f"{config}_batch{batch}", "threads": torch.get_num_threads(), "median_s": median,
            "samples_per_s": batch / median, "peak_rss_mb": peak_mb,
            "peer": f"torch {torch.__version__}, open_clip {open_clip.__version__}"}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(bench(args.config, args.batch, args.steps, args.warmup)), flush=True)
