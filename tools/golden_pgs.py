"""Golden files for PGS masking (pgs-spec.md), from peers:

tests/goldens/sinkhorn_pot.safetensors
    POT's log-domain Sinkhorn (ot.sinkhorn(..., method="sinkhorn_log"), float64) between n_c
    candidates (mass 1/n_c) and L patches (mass 1/L) with kernel exp(S/eps), for several
    (n_c, L, eps): the plan run to convergence and the plan after exactly 50 iterations.
    Cases are named nc{n_c}_L{L}_eps{eps}. <case>.s [n_c, L] f32 input, <case>.converged, <case>.iter50 [n_c, L] f64.

tests/goldens/pgs_reference_numpy.safetensors
    The `reference` mode (the public code's algorithm, as pgs-spec.md specifies it) ported to
    NumPy, on the three photos in tests/data (224x224, patch 16), with fixed uniform draws that the
    Rust test feeds in. float32 throughout, every reduction sequential in index order (np.cumsum),
    the same order as clip-pgs, because the public algorithm amplifies rounding (the "edge map" is
    Sobel over rounding noise, the signed Sinkhorn-Knopp blows up), so a different summation order
    would give a different mask. Also the reference edge grid from OpenCV (cv2.Sobel ksize 3,
    BORDER_CONSTANT, float64 on the patch-mean grid) as an independent check.
    Configs are named ed{0,1}_otn{0,1}_r{r_min}_e{epoch}.
    <config>.draws [N, 2L] f32, <config>.kept [N, L] u8 (1 = kept), <config>.candidates [N, n_c] i64,
    tokens [N, L, D] f32 (for configs with epoch > 0), reference_edges.numpy / .opencv [N, L].

Usage (from the repository root, in a virtualenv with tools/requirements.txt):
  python tools/golden_pgs.py
"""
import json
import os

import cv2
import numpy as np
import ot
from PIL import Image
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = np.float32
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=F)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=F)
PATCH = 16
PHOTOS = ["astronaut", "coffee", "chelsea"]


def seq_sum(x, axis=-1):
    """Sequential float32 sum in index order (what a plain loop does)."""
    return np.take(np.cumsum(x, axis=axis, dtype=F), -1, axis=axis)


def normalized_photo(name):
    rgb8 = np.asarray(Image.open(os.path.join(ROOT, "tests", "data", f"{name}_224.png")).convert("RGB"))
    x = rgb8.astype(F).transpose(2, 0, 1)
    return (x / F(255.0) - MEAN[:, None, None]) / STD[:, None, None]


def patchify(image, p):
    """[3, H, W] -> [L, 3p^2], each patch flattened (row, col, channel) as the public code."""
    c, h, w = image.shape
    x = image.transpose(1, 2, 0).reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // p) * (w // p), p * p * c)


def standardize(patches):
    n = patches.shape[1]
    mean = seq_sum(patches) / F(n)
    d = patches - mean[:, None]
    std = np.sqrt(seq_sum(d * d) / F(n - 1))
    return (patches - mean[:, None]) / (std[:, None] + F(1e-6))


def cosine_matrix(x):
    norm = np.sqrt(seq_sum(x * x))
    dot = seq_sum(x[:, None, :] * x[None, :, :])
    return dot / ((norm[:, None] + F(1e-6)) * (norm[None, :] + F(1e-6)))


def sobel_zero_pad(g):
    """3x3 Sobel magnitude with zero padding, the operation order of clip-pgs (sobel.rs)."""
    w = np.pad(g, 1)
    at = lambda dr, dc: w[1 + dr : w.shape[0] - 1 + dr, 1 + dc : w.shape[1] - 1 + dc]
    gx = (at(-1, 1) - at(-1, -1)) + F(2.0) * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + F(2.0) * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return np.sqrt(gx * gx + gy * gy)


def min_max(m):
    return (m - m.min()) / (m.max() - m.min() + F(1e-6))


def reference_edges(p_hat, rows, cols):
    grid = (seq_sum(p_hat) / F(p_hat.shape[1])).reshape(rows, cols)
    return min_max(sobel_zero_pad(grid)).reshape(-1), grid


def sinkhorn_knopp_signed(s):
    x = s.copy()
    for _ in range(50):
        col, row = seq_sum(x, axis=0), seq_sum(x, axis=1)
        if np.all(np.abs(col - F(1)) <= F(1e-3)) and np.all(np.abs(row - F(1)) <= F(1e-3)):
            break
        x = (x / (col[None, :] + F(1e-3))) / (row[:, None] + F(1e-3))
    return x


def reference_batch(images, tokens, draws, use_ed, use_otn, r_min, epoch):
    """pgs-spec.md, mode `reference`, for a batch; returns kept [N, L] (bool) and candidates."""
    n_img, _, h, w = images.shape
    rows, cols = h // PATCH, w // PATCH
    L = rows * cols
    n_c = L - int(np.floor(L * (1.0 - 0.05)))
    alpha = F(epoch) / F(32)
    flagged, edge_sums, candidates = [], [], []
    for n in range(n_img):
        p_hat = standardize(patchify(images[n], PATCH))
        edges = reference_edges(p_hat, rows, cols)[0] if use_ed else np.zeros(L, F)
        scores = draws[n, :L] + F(1e6) * edges
        cand = np.argsort(scores, kind="stable")[-n_c:]
        s_pix = cosine_matrix(p_hat)
        s_tok = cosine_matrix(tokens[n]) if tokens is not None else np.zeros((L, L), F)
        s = alpha * s_tok + (F(1) - alpha) * s_pix
        if use_otn:
            s = s + sinkhorn_knopp_signed(s)
        flagged.append((s[cand] > F(0.5)).any(axis=0))
        edge_sums.append(seq_sum(edges))
        candidates.append(np.sort(cand))
    fewest = min(int(f.sum()) for f in flagged)
    bonus = int(np.floor(min(edge_sums))) if use_ed else 0
    keep = min(int(np.floor(float(L) * (1.0 - float(F(r_min))))), L - fewest + bonus)
    kept = np.zeros((n_img, L), np.uint8)
    for n in range(n_img):
        order = np.lexsort((np.arange(L), draws[n, L:], flagged[n].astype(np.int64)))
        kept[n, order[:keep]] = 1
    return kept, np.stack(candidates).astype(np.int64)


def uniforms(rng, shape):
    """Uniforms on the same 23-bit grid as clip-pgs' Philox draws: (k + 0.5) / 2^23."""
    return ((rng.integers(0, 2**23, size=shape) + 0.5) / 2**23).astype(F)


def sinkhorn_goldens():
    rng = np.random.default_rng(1)
    tensors, cases = {}, []
    for n_c, L, eps in [(10, 196, 0.05), (3, 49, 0.05), (10, 196, 0.1), (5, 64, 0.02), (2, 16, 0.5)]:
        s = np.clip(rng.normal(0.0, 0.4, size=(n_c, L)), -1, 1).astype(F)
        a, b = np.full(n_c, 1.0 / n_c), np.full(L, 1.0 / L)
        m = -s.astype(np.float64)  # POT takes a cost: kernel exp(-M/reg) = exp(S/eps)
        converged = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
        iter50 = ot.sinkhorn(a, b, m, eps, method="sinkhorn_log", numItermax=50, stopThr=0.0, warn=False)
        name = f"nc{n_c}_L{L}_eps{eps}"  # the Rust test reads the settings from it
        cases.append(name)
        tensors[f"{name}.s"], tensors[f"{name}.converged"], tensors[f"{name}.iter50"] = s, converged, iter50
    meta = {"format": "clip-pgs-sinkhorn-golden-v1", "cases": ",".join(cases), "peer": f"POT {ot.__version__}",
            "command": "python tools/golden_pgs.py"}
    save_file(tensors, os.path.join(ROOT, "tests", "goldens", "sinkhorn_pot.safetensors"), metadata=meta)


def reference_goldens():
    rng = np.random.default_rng(2)
    images = np.stack([normalized_photo(n) for n in PHOTOS])
    n_img, L, dim = len(PHOTOS), (224 // PATCH) ** 2, 64
    tokens = rng.normal(size=(n_img, L, dim)).astype(F)
    tensors = {"tokens": tokens}
    configs = []
    for use_ed, use_otn, r_min, epoch in [(1, 1, 0.5, 0), (1, 1, 0.3, 8), (0, 1, 0.5, 0), (1, 0, 0.3, 0), (0, 0, 0.5, 16)]:
        name = f"ed{use_ed}_otn{use_otn}_r{r_min}_e{epoch}"  # the Rust test reads the settings from it
        draws = uniforms(rng, (n_img, 2 * L))
        kept, cand = reference_batch(images, tokens if epoch > 0 else None, draws, use_ed, use_otn, r_min, epoch)
        tensors[f"{name}.draws"], tensors[f"{name}.kept"], tensors[f"{name}.candidates"] = draws, kept, cand
        configs.append({"name": name, "use_ed": use_ed, "use_otn": use_otn, "r_min": r_min, "epoch": epoch,
                        "kept_per_image": int(kept[0].sum())})
    ours, opencv = [], []
    for n in range(n_img):
        p_hat = standardize(patchify(images[n], PATCH))
        e, grid = reference_edges(p_hat, 14, 14)
        ours.append(e)
        g = grid.astype(np.float64)
        gx = cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_CONSTANT)
        gy = cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_CONSTANT)
        mag = np.sqrt(gx * gx + gy * gy).reshape(-1)
        opencv.append((mag - mag.min()) / (mag.max() - mag.min() + 1e-6))
    tensors["reference_edges.numpy"] = np.stack(ours)
    tensors["reference_edges.opencv"] = np.stack(opencv).astype(F)
    print("reference edge grid, NumPy port vs OpenCV: max abs", np.abs(np.stack(ours) - np.stack(opencv)).max())
    meta = {"format": "clip-pgs-reference-golden-v1", "photos": json.dumps(PHOTOS), "patch": str(PATCH),
            "configs": ",".join(c["name"] for c in configs), "peer": f"numpy {np.__version__}, opencv {cv2.__version__}",
            "command": "python tools/golden_pgs.py"}
    save_file(tensors, os.path.join(ROOT, "tests", "goldens", "pgs_reference_numpy.safetensors"), metadata=meta)
    for c in configs:
        print(c)


if __name__ == "__main__":
    sinkhorn_goldens()
    reference_goldens()
    for f in ["sinkhorn_pot.safetensors", "pgs_reference_numpy.safetensors"]:
        path = os.path.join(ROOT, "tests", "goldens", f)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
