"""Checks that open_clip loads a checkpoint clip-pgs wrote: create_model from the checkpoint's
config metadata, load_state_dict(strict=True), then encode the golden's inputs and compare with
the golden's expected features (same parameters, so the same numbers).

  cargo run --release -- parity --golden tests/goldens/clip_tiny-a_masked.safetensors --save-checkpoint /tmp/ck.safetensors
  python tools/checkpoint_open_clip.py /tmp/ck.safetensors tests/goldens/clip_tiny-a_unmasked.safetensors
"""
import json
import sys

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file


def main(checkpoint, golden):
    with safe_open(checkpoint, "pt") as f:
        config = json.loads(f.metadata()["config"])
    open_clip.factory._MODEL_CONFIGS["from-clip-pgs"] = config
    model = open_clip.create_model("from-clip-pgs", pretrained=None).float().eval()
    missing, unexpected = model.load_state_dict(load_file(checkpoint), strict=True)
    g = load_file(golden)
    with torch.no_grad():
        img = model.encode_image(g["input.image"])
        txt = model.encode_text(g["input.text"])
    err = max((img - g["expected.image_features"]).abs().max().item(), (txt - g["expected.text_features"]).abs().max().item())
    print(f"open_clip loaded {checkpoint} strictly; max |features - golden| = {err:.2e}")
    assert err < 1e-5, err


if __name__ == "__main__":
    main(*sys.argv[1:3])
