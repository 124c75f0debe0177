#!/usr/bin/env bash
# One CPU training step, ours (criterion, benches/train_step.rs) and PyTorch + open_clip's
# (tools/bench_step_torch.py), in the same run with the same thread count; writes
# benches/results/train_step_cpu.md.
#   PYTHON=~/venv/bin/python THREADS=2 bash tools/bench_train_step.sh
# PYTHON needs torch and open_clip_torch (CPU wheels are enough).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
PYTHON=${PYTHON:-python3}
RAYON_NUM_THREADS=$THREADS cargo bench --bench train_step
torch_json=$("$PYTHON" tools/bench_step_torch.py --threads "$THREADS" 2>/dev/null)
"$PYTHON" - "$THREADS" "$torch_json" <<'PY'
import json, os, platform, subprocess, sys
threads, torch_lines = sys.argv[1], sys.argv[2].splitlines()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = " (uncommitted changes)" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip() else ""
rows = []
for line in torch_lines:
    t = json.loads(line)
    est = json.load(open(f"target/criterion/train_step_cpu/{t['name']}/new/estimates.json"))
    ours = est["median"]["point_estimate"] / 1e9
    batch = int(t["name"].rsplit("batch", 1)[1])
    rows.append(f"| {t['name']} | {ours * 1e3:.1f} | {batch / ours:.2f} | {t['median_s'] * 1e3:.1f} | {t['samples_per_s']:.2f} | {t['median_s'] / ours:.2f}× |")
out = f"""# One CPU training step: clip-pgs against PyTorch + open_clip

Forward, contrastive loss, backward and AdamW (open_clip's decay groups) on random images and real
captions; median of 10 steps after warm-up. Same run, same machine, {threads} threads
(RAYON_NUM_THREADS for ours, torch.set_num_threads for the peer).

- device: {cpu}, {os.cpu_count()} logical CPUs
- commit: {commit}{dirty}
- command: `PYTHON=… THREADS={threads} bash tools/bench_train_step.sh`
- peer: {json.loads(torch_lines[0])['peer']}

| config, batch | ours ms/step | ours samples/s | PyTorch ms/step | PyTorch samples/s | ours faster by |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
open("benches/results/train_step_cpu.md", "w").write(out)
print(out)
PY
