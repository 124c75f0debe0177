"""open_clip's training step on a GPU, timed as `clip-pgs bench step --device cuda` times ours:
forward, ClipLoss, backward and AdamW (open_clip's decay groups; lr 5e-4, betas (0.9, 0.98),
eps 1e-6, weight decay 0.2) on random normalized images and tokenized captions, under open_clip's
`--precision amp_bf16` (fp32 weights, torch.autocast to bf16) with TF32 allowed as open_clip's
main.py does. `--mask flip --mask-ratio 0.5` is open_clip's `--force-patch-dropout 0.5` (FLIP);
open_clip has no PGS. The batch is copied host → GPU inside each step (pinned memory, as from
open_clip's data loader), as ours uploads it inside its step.

Warm-up steps, then each step between two torch.cuda.Event(enable_timing=True); the median (with
min and max) gives ms/step, samples/s and MFU = model FLOPs per step / time / 790e12, the measured
H100 bf16 dense GEMM rate (the same yardstick and the same FLOP formula as ours:
model/src/bench.rs `train_step_flops`). Peak memory: `torch.cuda.max_memory_allocated()`, the
caching allocator's peak (tensors only; not the driver's view), beside the allocator's reserved
peak and the driver's used memory measured as ours is (total − free after the warm-up and every
step, the max, minus the used memory right before the model was built).

`--device cpu` is a smoke test: f32, no autocast, wall-clock timing, peak RSS.
`--count-flops` also counts one step's matrix-product FLOPs with torch's FlopCounterMode (fp32,
before the timing) and prints them beside the formula's.

Prints one JSON line: name, device, mask, kept_tokens, precision, steps, warmup, median_s, min_s,
max_s, ms_per_step, samples_per_s, flops_per_step, mfu, peak_gpu_mb, peak_reserved_mb,
driver_used_mb, peak_rss_mb, commit, peer.

Usage: python tools/bench_open_clip.py --batch 256 --mask flip --mask-ratio 0.5
       python tools/bench_open_clip.py --device cpu --batch 2 --steps 1 --warmup 0
(tools/bench_step_gpu.sh runs it interleaved with ours)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import open_clip
import torch

from open_clip_step import CAPTIONS, ROOT, adamw, model_config

# The measured bf16 dense GEMM rate of an H100 (the issue; src/bench/mod.rs GEMM_FLOPS): MFU's yardstick.
GEMM_FLOPS = 790e12
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def train_step_flops(cfg, batch, kept):
    """Model FLOPs of one training step, as model/src/bench.rs `train_step_flops`: 6 × the
    multiply-adds of every linear layer (the patch embedding on all L patches; q/k/v, attention
    output and MLP on each token, image sequence 1 + kept, text the context length; the two
    projections on one pooled token each) + 3 × the forward's attention score and value products
    (2 · s² · width per block), 2 FLOPs per multiply-add."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    v_mlp = int(v["width"] * v.get("mlp_ratio", 4.0))
    t_mlp = int(t["width"] * t.get("mlp_ratio", 4.0))
    ctx = t.get("context_length", 77)

    def block(width, mlp):
        return 4 * width * width + 2 * width * mlp

    def attention(tokens, width):
        return 2 * tokens * tokens * width

    s = 1 + kept
    image = (patches * 3 * v["patch_size"] ** 2 * v["width"]
             + v["layers"] * (s * block(v["width"], v_mlp) + attention(s, v["width"]))
             + v["width"] * cfg["embed_dim"])
    text = t["layers"] * (ctx * block(t["width"], t_mlp) + attention(ctx, t["width"])) + t["width"] * cfg["embed_dim"]
    return 6 * batch * (image + text)


def commit():
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def driver_used(device):
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def bench(args):
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_open_clip: --device cuda but torch sees no CUDA GPU "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    device = torch.device(args.device)
    cfg = model_config(args.model)
    patches = (cfg["vision_cfg"]["image_size"] // cfg["vision_cfg"]["patch_size"]) ** 2
    ratio = args.mask_ratio if args.mask == "flip" else 0.0
    # open_clip's PatchDropout keeps max(1, int(L · (1 − p))) patches (ours: L − floor(p · L)).
    kept = max(1, int(patches * (1 - ratio))) if ratio > 0 else patches
    flops = train_step_flops(cfg, args.batch, kept)

    if cuda:
        # open_clip's main.py on CUDA.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.zeros(1, device=device)  # the context, before the baseline
        torch.cuda.synchronize(device)
        baseline = driver_used(device)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None, device=device,
                                   force_patch_dropout=ratio if ratio > 0 else None).train()
    size = cfg["vision_cfg"]["image_size"]
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    images = (torch.rand(args.batch, 3, size, size) - mean) / std
    text = open_clip.get_tokenizer(args.model)([CAPTIONS[i % 4] for i in range(args.batch)],
                                               context_length=cfg["text_cfg"].get("context_length", 77))
    if cuda:
        images, text = images.pin_memory(), text.pin_memory()
    loss_fn = open_clip.ClipLoss()
    opt = adamw(model)

    counted = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            loss_fn(*model(images.to(device), text.to(device))).backward()
        opt.zero_grad(set_to_none=True)
        counted = counter.get_total_flops()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        x, t = images.to(device, non_blocking=True), text.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(*model(x, t))
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    used = []
    if cuda:
        torch.cuda.synchronize(device)
        used.append(driver_used(device) - baseline)
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            used.append(driver_used(device) - baseline)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    mb = lambda b: b / 2**20
    out = {
        "name": f"{args.model}_batch{args.batch}",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "mask": f"{args.mask.capitalize()} {args.mask_ratio}",
        "kept_tokens": kept,
        "precision": "amp_bf16 (bf16 autocast, fp32 weights, TF32 allowed)" if cuda else "fp32",
        "steps": args.steps,
        "warmup": args.warmup,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "ms_per_step": median * 1e3,
        "samples_per_s": args.batch / median,
        "flops_per_step": flops,
        "mfu": flops / median / GEMM_FLOPS,
        "mfu_yardstick": "790 TFLOP/s, the measured H100 bf16 dense GEMM rate",
        # The caching allocator's peak (tensors), not the driver's used memory.
        "peak_gpu_mb": mb(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "peak_reserved_mb": mb(torch.cuda.max_memory_reserved(device)) if cuda else None,
        # As ours measures it: the driver's total − free, the max over the samples, minus the baseline.
        "driver_used_mb": mb(max(used)) if cuda else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "commit": commit(),
        "peer": f"torch {torch.__version__}, open_clip {open_clip.__version__}",
    }
    if counted is not None:
        # FlopCounterMode counts the matrix products as they run, the formula model FLOPs: torch
        # adds the logits and the scores SDPA recomputes in its backward (5 products, not 4) and
        # has no input gradient for the patch embedding (the images need none). ViT-B-16: within
        # 0.5% (model/src/bench.rs reconciles the two exactly).
        out["torch_counted_flops"] = counted
        out["torch_counted_over_formula"] = counted / flops
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mask", choices=["none", "flip"], default="none",
                    help="flip: open_clip's patch dropout (--force-patch-dropout); open_clip has no PGS")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--count-flops", action="store_true",
                    help="also count one step's FLOPs with torch's FlopCounterMode (untimed)")
    args = ap.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--batch and --steps must be at least 1, --warmup at least 0")
    if not 0.0 <= args.mask_ratio < 1.0:
        ap.error(f"--mask-ratio {args.mask_ratio}: expected a number in [0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(bench(args)), flush=True)
