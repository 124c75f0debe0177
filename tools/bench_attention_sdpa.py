"""PyTorch's scaled_dot_product_attention on the shapes of `clip-pgs bench attention`, in its JSON
line format: ViT-B/16 (12 heads of 64) at S = 197, at PGS's fixed 50 % (S = 99) and at PGS's
dynamic ragged lengths (the same lengths: Philox is not reproduced here, so they are passed in
with --lengths, as `clip-pgs bench attention` prints them), the text tower (8 heads of 64) at
S = 77 causal; forward and backward, bf16, per backend (flash, cuDNN, memory-efficient; a backend
that refuses a case is reported as such). Ragged lengths: nested (jagged) tensors for the flash
backend, a boolean key mask [B, 1, 1, S] for the others. TFLOP/s count only the unmasked work
(4·D per visible pair and head forward, 2.5 times that backward), as the Rust side does.

    python tools/bench_attention_sdpa.py --batch 32 --lengths 120,87,...
"""

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def cases(batch, lengths):
    return [
        ("vit-b-16 S=197", 12, [197] * batch, False),
        ("vit-b-16 PGS 50% S=99", 12, [99] * batch, False),
        ("vit-b-16 PGS dynamic", 12, lengths, False),
        ("text S=77 causal", 8, [77] * batch, True),
    ]


def flops(heads, lengths, causal, d=64):
    pairs = sum(l * (l + 1) // 2 if causal else l * l for l in lengths)
    return 4.0 * d * heads * pairs


def timed(fn, repeats):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def inputs(heads, lengths, jagged):
    seq, d = max(lengths), 64
    if jagged:
        make = lambda: torch.nested.nested_tensor(
            [torch.rand(l, heads, d, device="cuda", dtype=torch.bfloat16) * 2 - 1 for l in lengths],
            layout=torch.jagged, requires_grad=True)
        return [make().transpose(1, 2) for _ in range(3)], None
    q, k, v = (torch.rand(len(lengths), heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = None
    if min(lengths) < seq:
        keys = torch.arange(seq, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
        mask = keys[:, None, None, :]
    return [q, k, v], mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--lengths", type=str, default="", help="PGS dynamic lengths, comma-separated")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [99] * args.batch
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for name, heads, lens, causal in cases(args.batch, lengths):
        work = flops(heads, lens, causal)
        for backend, which in backends:
            line = {"case": name, "path": f"torch-sdpa-{backend}", "batch": len(lens)}
            try:
                ragged = min(lens) < max(lens)
                (q, k, v), mask = inputs(heads, lens, jagged=ragged and backend == "flash")
                with sdpa_kernel(which):
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
                    out = fwd()
                    grad = torch.ones_like(out)
                    t = timed(fwd, args.repeats)
                    line.update(forward_ms=round(t * 1e3, 4), forward_tflops=round(work / t / 1e12, 1))
                    back = lambda: torch.autograd.grad(out, (q, k, v), grad_outputs=grad, retain_graph=True)
                    t = timed(back, args.repeats)
                    line.update(backward_ms=round(t * 1e3, 4), backward_tflops=round(2.5 * work / t / 1e12, 1))
            except RuntimeError as e:
                line["unsupported"] = str(e).splitlines()[0][:200]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
