"""Golden files from open_clip (CPU, float32) in the `clip-golden-v1` format that
`clip-pgs parity --golden FILE` and tests/clip_parity.rs read:

  metadata  format = "clip-golden-v1"; config = the model-config JSON;
            optim = {"lr", "betas", "eps", "weight_decay", "steps"}
  tensors   every parameter under its open_clip state_dict() name;
            input.image [B,3,H,W] f32 (normalized), input.text [B,T] i64,
            input.keep [B,K] i64 (optional: kept patch indices, gathered after the positional
            embedding and before ln_pre, CLS kept first);
            expected.image_features / expected.text_features [B,E] (projected, not normalized),
            expected.logits_per_image [B,B], expected.loss [], expected.grad.<name> for every
            parameter, expected.losses [steps]: the loss before each AdamW step on that batch
            (open_clip's weight-decay groups, logit scale clamped to [0, ln 100] after each step).

Usage (a virtualenv with torch and open_clip_torch from PyPI; CPU is enough):
  python tools/golden_open_clip.py            # writes tests/goldens/clip_<config>_<unmasked|masked>.safetensors
"""
import json
import math
import os

import open_clip
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "tiny-a": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 2}},
    "tiny-b": {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 24, "patch_size": 4, "head_width": 8, "mlp_ratio": 2.0},
               "text_cfg": {"context_length": 8, "vocab_size": 300, "width": 16, "heads": 4, "layers": 2}},
}
OPTIM = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2, "steps": 3}


class KeepGather(torch.nn.Module):
    """In place of open_clip's patch_dropout: keep CLS and the given patch rows."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        patches = torch.gather(x[:, 1:], 1, self.keep[:, :, None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


def run(name, cfg, masked):
    torch.manual_seed(0)
    open_clip.factory._MODEL_CONFIGS[name] = cfg
    model = open_clip.create_model(name, pretrained=None).float()
    for n, p in model.named_parameters():  # open_clip's init leaves some tensors 0: give every one signal
        if "ln" in n or n.endswith("bias"):
            p.data += 0.1 * torch.randn_like(p)
    b, v, t = 4, cfg["vision_cfg"], cfg["text_cfg"]
    image = torch.randn(b, 3, v["image_size"], v["image_size"])
    text = torch.randint(1, t["vocab_size"] - 1, (b, t["context_length"]))
    lengths = [t["context_length"], 5, 3, t["context_length"] - 2]
    for i, n in enumerate(lengths):  # EOT = the largest id, then padding
        text[i, n - 1] = t["vocab_size"] - 1
        text[i, n:] = 0
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    tensors["input.image"], tensors["input.text"] = image, text
    if masked:
        l = (v["image_size"] // v["patch_size"]) ** 2
        keep = torch.stack([torch.randperm(l)[: l // 2].sort().values for _ in range(b)])
        model.visual.patch_dropout = KeepGather(keep)
        tensors["input.keep"] = keep
    model.train()
    img_f, txt_f, scale = model(image, text)
    loss_fn = open_clip.ClipLoss()
    loss = loss_fn(img_f, txt_f, scale)
    loss.backward()
    # model(...) returns normalized features; the golden keeps the projections before that.
    with torch.no_grad():
        tensors["expected.image_features"] = model.encode_image(image, normalize=False)
        tensors["expected.text_features"] = model.encode_text(text, normalize=False)
    tensors["expected.logits_per_image"] = (scale * torch.nn.functional.normalize(img_f, dim=-1) @ torch.nn.functional.normalize(txt_f, dim=-1).t()).detach()
    tensors["expected.loss"] = loss.detach().reshape(())
    for n, p in model.named_parameters():
        tensors[f"expected.grad.{n}"] = p.grad.detach().clone()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": OPTIM["weight_decay"]}],
        lr=OPTIM["lr"], betas=tuple(OPTIM["betas"]), eps=OPTIM["eps"])
    losses = []
    for _ in range(OPTIM["steps"]):
        opt.zero_grad()
        img_f, txt_f, scale = model(image, text)
        step_loss = loss_fn(img_f, txt_f, scale)
        losses.append(step_loss.item())
        step_loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    tensors["expected.losses"] = torch.tensor(losses)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": "clip-golden-v1", "config": json.dumps(cfg), "optim": json.dumps(OPTIM),
            "peer": f"open_clip {open_clip.__version__}, torch {torch.__version__}", "command": "python tools/golden_open_clip.py"}
    out = os.path.join(ROOT, "tests", "goldens", f"clip_{name}_{'masked' if masked else 'unmasked'}.safetensors")
    save_file(tensors, out, metadata=meta)
    print(f"wrote {out} ({os.path.getsize(out)} bytes): loss {loss.item():.6f}, losses {losses}")


if __name__ == "__main__":
    for name, cfg in CONFIGS.items():
        for masked in (False, True):
            run(name, cfg, masked)
