"""Golden files for the PGS edge map (pgs-spec.md step 1, mode `paper`), computed with OpenCV.

Writes, for three real photos from the scikit-image wheel (astronaut, coffee, chelsea) at
224x224 and 64x64:
  tests/data/<name>_<size>.png           the photo resized (PIL bicubic) to size x size, RGB8
  tests/goldens/edge_map_opencv.safetensors
      <name>_<size>.magnitude  f32 [size, size]   Sobel magnitude of the luminance
      <name>_<size>.edges      f32 [L]            E for patch 16 (L = (size/16)^2)

The reference runs in float64: the PNG is normalized exactly as clip-pgs does (float32
(v/255 - mean)/std), de-normalized, turned into luminance 0.299R + 0.587G + 0.114B, and given to
cv2.Sobel(ksize=3, BORDER_REPLICATE) for dx and dy; magnitude sqrt(gx^2 + gy^2); per-patch mean;
per-image (e - min)/(max - min + 1e-6).

Usage (from the repository root, in a virtualenv with tools/requirements.txt):
  python tools/golden_edge_map.py
"""
import json
import os

import cv2
import numpy as np
import skimage
from PIL import Image
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["astronaut", "coffee", "chelsea"]
SIZES = [224, 64]
PATCH = 16
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def normalize(rgb8):
    """[H, W, 3] uint8 -> [3, H, W] float32, the same float32 operations as clip-pgs."""
    x = rgb8.astype(np.float32).transpose(2, 0, 1)
    return (x / np.float32(255.0) - MEAN[:, None, None]) / STD[:, None, None]


def edge_map(normalized, patch):
    rgb = normalized.astype(np.float64) * STD.astype(np.float64)[:, None, None] + MEAN.astype(np.float64)[:, None, None]
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    gx = cv2.Sobel(luma, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(luma, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = np.sqrt(gx * gx + gy * gy)
    h, w = magnitude.shape
    e = magnitude.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3)).reshape(-1)
    edges = (e - e.min()) / (e.max() - e.min() + 1e-6)
    return magnitude, edges


def main():
    tensors = {}
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        for size in SIZES:
            path = os.path.join(ROOT, "tests", "data", f"{name}_{size}.png")
            Image.fromarray(photo).convert("RGB").resize((size, size), Image.BICUBIC).save(path, optimize=True)
            rgb8 = np.asarray(Image.open(path).convert("RGB"))  # exactly the bytes clip-pgs will read
            magnitude, edges = edge_map(normalize(rgb8), PATCH)
            tensors[f"{name}_{size}.magnitude"] = magnitude.astype(np.float32)
            tensors[f"{name}_{size}.edges"] = edges.astype(np.float32)
    metadata = {
        "format": "clip-pgs-edge-map-golden-v1",
        "patch": str(PATCH),
        "peer": f"opencv {cv2.__version__}, scikit-image {skimage.__version__}, numpy {np.__version__}",
        "command": "python tools/golden_edge_map.py",
        "photos": json.dumps(PHOTOS),
        "sizes": json.dumps(SIZES),
    }
    out = os.path.join(ROOT, "tests", "goldens", "edge_map_opencv.safetensors")
    save_file(tensors, out, metadata=metadata)
    print(f"wrote {out} ({os.path.getsize(out)} bytes) and {len(PHOTOS) * len(SIZES)} PNGs in tests/data")


if __name__ == "__main__":
    main()
