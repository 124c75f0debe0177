#!/usr/bin/env bash
# ViT-B/16 training steps on a GPU, side by side: ours (`clip-pgs bench step --device cuda`: none,
# FLIP 0.5, PGS 0.5) and open_clip's (tools/bench_open_clip.py: none, FLIP 0.5 as patch dropout;
# open_clip has no PGS), interleaved: ours none, open_clip none, ours FLIP, open_clip FLIP, ours PGS,
# then again, REPEATS rounds, each run a fresh process of WARMUP + STEPS steps timed with CUDA
# events. Ratios are taken within a round (neighbouring runs), then the median with min and max.
# Writes benches/results/train-step-<gpu>-<commit>.md.
#
# The GPU machine needs no Rust toolchain: CLIP_PGS is a prebuilt binary (`../shared/tools/gpu-stage`
# here puts it in .gpu/bin/, with .gpu/env.sh for the CUDA libraries). PYTHON needs torch with CUDA
# and open_clip_torch. From the project root on the GPU machine:
#   PYTHON=~/venv/bin/python bash .gpu/env.sh bash tools/bench_step_gpu.sh
#   CLIP_PGS=target/release/clip-pgs PYTHON=… REPEATS=5 STEPS=30 bash tools/bench_step_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${CLIP_PGS:-} ]]; then
    CLIP_PGS=.gpu/bin/clip-pgs
    [[ -x $CLIP_PGS ]] || CLIP_PGS=target/release/clip-pgs
fi
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-ViT-B-16}
BATCH=${BATCH:-256}
RATIO=${RATIO:-0.5}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}

die() { echo "bench_step_gpu.sh: $*" >&2; exit 1; }
[[ -x $CLIP_PGS ]] || die "no clip-pgs binary at $CLIP_PGS (set CLIP_PGS, or run ../shared/tools/gpu-stage where Rust is)"
command -v nvidia-smi > /dev/null || die "nvidia-smi not found: no NVIDIA driver, no GPU to benchmark on"
gpus=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) ||
    die "nvidia-smi sees no GPU: $gpus"
[[ -n $gpus ]] || die "nvidia-smi lists no GPU"
"$PYTHON" -c 'import torch, open_clip, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null ||
    die "$PYTHON cannot run open_clip on CUDA (needs torch with CUDA and open_clip_torch, and a visible GPU)"
echo "GPU: $gpus" >&2

runs=$(mktemp)
trap 'rm -f "$runs"' EXIT
ours() { # mask
    "$CLIP_PGS" bench step --device cuda --model "$MODEL" --batch "$BATCH" --mask "$1" --mask-ratio "$RATIO" \
        --steps "$STEPS" --warmup "$WARMUP" || die "ours ($1) failed: the error is above"
}
peer() { # mask
    "$PYTHON" tools/bench_open_clip.py --device cuda --model "$MODEL" --batch "$BATCH" --mask "$1" \
        --mask-ratio "$RATIO" --steps "$STEPS" --warmup "$WARMUP" 2> >(grep -v "No pretrained weights" >&2) ||
        die "open_clip ($1) failed: the error is above"
}
for round in $(seq "$REPEATS"); do
    for run in ours:none open_clip:none ours:flip open_clip:flip ours:pgs; do
        who=${run%%:*} mask=${run##*:}
        if [[ $who == ours ]]; then out=$(ours "$mask"); else out=$(peer "$mask"); fi
        out=$(tail -n 1 <<< "$out")
        echo "{\"round\": $round, \"who\": \"$who\", \"mask\": \"$mask\", \"result\": $out}" >> "$runs"
        echo "round $round, $who $mask: $("$PYTHON" -c 'import json,sys; r=json.load(sys.stdin); print("%.1f ms/step, %.0f samples/s" % (r["ms_per_step"], r["samples_per_s"]))' <<< "$out")" >&2
    done
done

"$PYTHON" - "$runs" "$gpus" "$MODEL" "$BATCH" "$RATIO" "$REPEATS" "$STEPS" "$WARMUP" <<'PY'
import json, os, re, statistics, sys
path, gpus, model, batch, ratio, repeats, steps, warmup = sys.argv[1:9]
runs = [json.loads(l) for l in open(path)]
by = lambda who, mask: [r["result"] for r in runs if r["who"] == who and r["mask"] == mask]
ours_any, peer_any = by("ours", "none")[0], by("open_clip", "none")[0]
commit = ours_any["commit"]
gpu = peer_any["device"]
gpu_slug = "".join(c.lower() if c.isascii() and c.isalnum() else "-" for c in gpu)
configs = [("ours", "none", "ours, no mask"), ("ours", "flip", f"ours, FLIP {ratio}"),
           ("ours", "pgs", f"ours, PGS {ratio}"), ("open_clip", "none", "open_clip, no mask"),
           ("open_clip", "flip", f"open_clip, FLIP {ratio} (patch dropout)")]

def mb(v):
    return "–" if v is None else f"{v:.0f}"

rows = []
for who, mask, label in configs:
    rs = by(who, mask)
    med = statistics.median(r["median_s"] for r in rs)
    lo, hi = min(r["min_s"] for r in rs), max(r["max_s"] for r in rs)
    peak = max(r["peak_gpu_mb"] for r in rs)
    driver = max(r.get("driver_used_mb") or r["peak_gpu_mb"] for r in rs)
    mfu = statistics.median(r["mfu"] for r in rs)
    rows.append(f"| {label} | {rs[0]['kept_tokens']} | {int(batch) / med:.0f} | {med * 1e3:.1f} ({lo * 1e3:.1f}–{hi * 1e3:.1f}) | "
                f"{100 * mfu:.1f}% | {rs[0]['flops_per_step'] / 1e12:.2f} | {mb(peak)} | {mb(driver)} | {rs[0]['precision']} |")

def ratio_row(a, b, label):
    """samples/s of a over b, per round (neighbouring runs), median (min–max)."""
    rounds = sorted({r["round"] for r in runs})
    get = lambda who, mask, k: next(r["result"]["median_s"] for r in runs if (r["who"], r["mask"], r["round"]) == (who, mask, k))
    v = [get(*b, k) / get(*a, k) for k in rounds]
    return f"| {label} | {statistics.median(v):.2f}× ({min(v):.2f}–{max(v):.2f}) |"

ratios = [ratio_row(("ours", "pgs"), ("open_clip", "flip"), f"ours PGS {ratio} / open_clip FLIP {ratio}"),
          ratio_row(("ours", "pgs"), ("open_clip", "none"), f"ours PGS {ratio} / open_clip no mask"),
          ratio_row(("ours", "flip"), ("open_clip", "flip"), f"ours FLIP {ratio} / open_clip FLIP {ratio}"),
          ratio_row(("ours", "none"), ("open_clip", "none"), "ours no mask / open_clip no mask"),
          ratio_row(("ours", "pgs"), ("ours", "none"), f"ours PGS {ratio} / ours no mask")]
command = f"CLIP_PGS=… PYTHON=… REPEATS={repeats} STEPS={steps} WARMUP={warmup} MODEL={model} BATCH={batch} RATIO={ratio} bash tools/bench_step_gpu.sh"
out = f"""# {model} training step on a GPU: clip-pgs against open_clip

One training step (the batch copied to the GPU, the masks, forward, contrastive loss, backward,
AdamW with open_clip's settings) at batch {batch}, random images and real captions. {repeats} rounds,
interleaved (ours none, open_clip none, ours FLIP, open_clip FLIP, ours PGS), each run a fresh
process of {warmup} warm-up + {steps} steps timed with CUDA events; ms/step is the median of the
rounds' medians (fastest and slowest single step). **open_clip has no PGS**: ours with PGS is set
beside open_clip's FLIP (patch dropout, `--force-patch-dropout {ratio}`) and unmasked step.

- device: {gpu} ({gpus})
- commit: {commit} (ours: `clip-pgs bench step --device cuda --model {model} --batch {batch} --mask none|flip|pgs --mask-ratio {ratio}`)
- command: `{command}`
- peer: {peer_any['peer']}, `tools/bench_open_clip.py`
- MFU: model FLOPs per step (`train_step_flops` in model/src/bench.rs, the same formula in
  tools/bench_open_clip.py: 6 × the linear layers' multiply-adds + 3 × the forward's attention
  products, image sequence 1 + kept) / time / 790 TFLOP/s, the measured H100 bf16 dense GEMM rate,
  for both, whatever their precision.
- Peak memory: ours is the driver's used GPU memory (total − free, sampled after the warm-up and
  after every step) above what was used before the workload was built; open_clip's is
  `torch.cuda.max_memory_allocated()`, the caching allocator's peak (tensors only, not the driver's
  view). "Driver used" measures both as ours is measured (for open_clip: above the used memory right
  after CUDA was initialized, before the model).

| run | image tokens kept | samples/s | ms/step (min–max) | MFU | TFLOP/step | peak memory MB | driver used MB | precision |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + """

| samples/s ratio (per round) | median (min–max) |
|---|---|
""" + "\n".join(ratios) + "\n"
os.makedirs("benches/results", exist_ok=True)
dest = f"benches/results/train-step-{gpu_slug}-{commit}.md"
open(dest, "w").write(out)
print(out)
print(f"wrote {dest}", file=sys.stderr)
PY
