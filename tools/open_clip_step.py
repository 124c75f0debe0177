"""The open_clip side of the step benchmarks, shared by tools/bench_step_torch.py (CPU) and
tools/bench_open_clip.py (GPU): the captions, the model config (this project's configs registered
with open_clip when open_clip lacks them) and AdamW with open_clip's decay groups."""
import json
import os
import sys

import open_clip
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a photo of a cat", "a red circle left of a blue square", "an astronaut on the moon", "a cup of coffee"]


def model_config(name):
    """open_clip's config for `name`, or this project's (model/configs/NAME.json, registered with
    open_clip) for the configs open_clip lacks (test-tiny, …)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        path = os.path.join(ROOT, "model", "configs", f"{name}.json")
        if not os.path.exists(path):
            sys.exit(f"unknown model {name!r}: not in open_clip and no {path}")
        with open(path) as f:
            cfg = json.load(f)
        open_clip.factory._MODEL_CONFIGS[name] = cfg
    return cfg


def adamw(model, lr=5e-4, weight_decay=0.2):
    """open_clip's AdamW: no decay on gains, biases, norms and the logit scale."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    params = list(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": weight_decay}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)
