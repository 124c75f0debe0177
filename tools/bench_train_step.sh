#!/usr/bin/env bash
# One CPU training step, ours (`clip-pgs bench step`) against PyTorch + open_clip's
# (tools/bench_step_torch.py), interleaved: ours, PyTorch, ours, … PAIRS pairs per config, each a
# fresh process of WARMUP + STEPS steps, same thread count. On shared cores one-after-the-other
# timings drift; the median of the pairwise ratios (with min and max) does not. Writes
# benches/results/train_step_cpu.md.
#   PYTHON=~/venv/bin/python THREADS=2 bash tools/bench_train_step.sh
# PYTHON needs torch and open_clip_torch (CPU wheels are enough).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
PYTHON=${PYTHON:-python3}
PAIRS=${PAIRS:-5}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
CONFIGS=${CONFIGS:-"test-tiny:32 ViT-B-16:2 ViT-B-16:8"}
cargo build --release --quiet
runs=$(mktemp)
for cb in $CONFIGS; do
    config=${cb%%:*} batch=${cb##*:}
    for pair in $(seq "$PAIRS"); do
        ours=$(RAYON_NUM_THREADS=$THREADS target/release/clip-pgs bench step --model "$config" --batch "$batch" --steps "$STEPS" --warmup "$WARMUP")
        torch=$("$PYTHON" tools/bench_step_torch.py --config "$config" --batch "$batch" --threads "$THREADS" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null)
        echo "{\"pair\": $pair, \"ours\": $ours, \"torch\": $torch}" >> "$runs"
        echo "$config batch $batch pair $pair: ours $(echo "$ours" | "$PYTHON" -c 'import json,sys; print(round(json.load(sys.stdin)["median_s"], 4))') s, PyTorch $(echo "$torch" | "$PYTHON" -c 'import json,sys; print(round(json.load(sys.stdin)["median_s"], 4))') s" >&2
    done
done
"$PYTHON" - "$THREADS" "$PAIRS" "$STEPS" "$WARMUP" "$runs" <<'PY'
import json, os, platform, statistics, subprocess, sys
threads, pairs, steps, warmup, path = sys.argv[1:6]
runs = [json.loads(l) for l in open(path)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = " (uncommitted changes)" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip() else ""
rows = []
for name in dict.fromkeys(r["ours"]["name"] for r in runs):
    rs = [r for r in runs if r["ours"]["name"] == name]
    ratios = [r["torch"]["median_s"] / r["ours"]["median_s"] for r in rs]
    ours = statistics.median(r["ours"]["median_s"] for r in rs)
    torch = statistics.median(r["torch"]["median_s"] for r in rs)
    batch = int(name.rsplit("batch", 1)[1])
    rss = (max(r["ours"]["peak_rss_mb"] for r in rs), max(r["torch"]["peak_rss_mb"] for r in rs))
    rows.append(f"| {name} | {ours * 1e3:.1f} | {batch / ours:.2f} | {torch * 1e3:.1f} | {batch / torch:.2f} | "
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | {rss[0]:.0f} | {rss[1]:.0f} |")
out = f"""# One CPU training step: clip-pgs against PyTorch + open_clip

Forward, contrastive loss, backward and AdamW (open_clip's decay groups) on random images and real
captions. Interleaved: {pairs} pairs per config (ours, then PyTorch, each a fresh process of
{warmup} warm-up + {steps} timed steps, median per process), {threads} threads (RAYON_NUM_THREADS
for ours, torch.set_num_threads for the peer). "Ours faster by" is the median over the pairs of
PyTorch's time / ours, with the smallest and largest pair. Peak RSS: the largest of the processes.

- device: {cpu}, {os.cpu_count()} logical CPUs
- commit: {commit}{dirty}
- command: `PYTHON=… THREADS={threads} bash tools/bench_train_step.sh`
- peer: {runs[0]['torch']['peer']}

| config, batch | ours ms/step | ours samples/s | PyTorch ms/step | PyTorch samples/s | ours faster by (min–max) | ours peak RSS MB | PyTorch peak RSS MB |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
open("benches/results/train_step_cpu.md", "w").write(out)
print(out)
PY
rm -f "$runs"
