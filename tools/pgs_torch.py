"""PyTorch implementation of the PGS `paper` pipeline (pgs-spec.md, fixed ratio), batched: the peer
that `clip-pgs bench pgs` is compared with on the same GPU, in the same session.

Same steps as clip-pgs: Sobel edge map (replicate border) -> Gumbel-top-k candidates -> cosine
similarity of standardized pixel patches (and tokens, alpha > 0) -> log-domain Sinkhorn
(eps 0.05, 50 iterations: PyTorch cannot stop early without a host sync, so it runs the cap)
-> mu = max_c S_hat * (1 - E), candidates forced -> top-K masked -> kept indices in raster order.
Random draws come from torch's generator, so masks match clip-pgs in distribution, not bit for bit.

Timing: CUDA events, L2 flushed (256 MB memset) before each repeat, median of the repeats.

Usage (on the GPU machine, which has torch):
  python3 tools/pgs_torch.py --batch 256 --size 224 --patch 16 --repeats 20 --out benches/results/pgs-torch.json
  python3 tools/pgs_torch.py --device cpu --batch 4 --size 64      # a quick check without a GPU
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def edge_map(x, p):
    rgb = x * STD.to(x)[None, :, None, None] + MEAN.to(x)[None, :, None, None]
    y = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k)
    e = F.avg_pool2d(torch.sqrt((g * g).sum(1, keepdim=True)), p).flatten(1)
    lo, hi = e.min(1, keepdim=True).values, e.max(1, keepdim=True).values
    return (e - lo) / (hi - lo + 1e-6)


def patchify(x, p):
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), p * p * c)


def unit_rows(v):
    return v / (v.norm(dim=-1, keepdim=True) + 1e-6)


def pgs_paper(x, p, ratio=0.5, tokens=None, alpha=0.0, eps=0.05, iterations=50, generator=None):
    e = edge_map(x, p)
    n, l = e.shape
    n_c = max(1, int(0.05 * l + 0.5))
    u = torch.rand(n, l, device=x.device, generator=generator).clamp_min(1e-12)
    cand = (torch.log(1 - e + 1e-3) - torch.log(-torch.log(u))).topk(n_c, dim=1).indices
    patches = patchify(x, p)
    hat = unit_rows((patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-6))
    pick = lambda v: torch.gather(v, 1, cand[:, :, None].expand(-1, -1, v.shape[-1]))
    s = pick(hat) @ hat.transpose(1, 2)
    if tokens is not None:
        t = unit_rows(tokens)
        s = alpha * (pick(t) @ t.transpose(1, 2)) + (1 - alpha) * s
    m = s / eps
    f = torch.zeros(n, n_c, device=x.device)
    g = torch.zeros(n, l, device=x.device)
    for _ in range(iterations):
        g = -math.log(l) - torch.logsumexp(m + f[:, :, None], dim=1)
        f = -math.log(n_c) - torch.logsumexp(m + g[:, None, :], dim=2)
    balanced = n_c * l * torch.exp(m + f[:, :, None] + g[:, None, :])
    mu = balanced.max(1).values * (1 - e)
    mu.scatter_(1, cand, float("inf"))
    k = int(math.floor(ratio * l))
    masked = torch.zeros(n, l, dtype=torch.bool, device=x.device)
    masked.scatter_(1, mu.topk(k, dim=1).indices, True)
    kept = torch.arange(l, device=x.device).expand(n, l)[~masked].reshape(n, l - k)
    return kept, cand, e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device(a.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(a.batch, 3, a.size, a.size, device=dev, generator=gen) * 4 - 2
    kept, cand, e = pgs_paper(x, a.patch, generator=gen)
    l = e.shape[1]
    assert kept.shape == (a.batch, l - l // 2), kept.shape
    assert not (kept[:, :, None] == cand[:, None, :]).any(), "a candidate was kept"
    print(f"masks: {a.batch} images, {l} patches, {l - kept.shape[1]} masked each, candidates never kept")
    if dev.type != "cuda":
        return
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    times = []
    for _ in range(a.repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pgs_paper(x, a.patch, generator=gen)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = sorted(times)[len(times) // 2]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": a.batch, "size": a.size,
              "patch": a.patch, "run": "paper_0.5_epoch0", "median_ms": median, "repeats": a.repeats,
              "command": "python3 tools/pgs_torch.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items() if v is not None)}
    print(json.dumps(result))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
