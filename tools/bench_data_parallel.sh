#!/usr/bin/env bash
# The data-parallel overhead on one machine: ViT-B/16 training steps (no masking, CPU device) as
# 1 process of batch 4 (every core) and as 2 ranks of batch 2 under mpirun (one thread each,
# --gather-with-grad); the median step time of each from the runs' metrics.jsonl (time between
# consecutive step records, the first step left out). Needs a release build with MPI:
#   cargo build --release --features mpi && bash tools/bench_data_parallel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/clip-pgs}
steps=${STEPS:-6}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
common=(train --model ViT-B-16 --data shapes --mask none --train-num-samples $((4 * steps)) --epochs 1
    --eval-samples 8 --zeroshot-frequency 0 --log-every-n-steps 1 --workers 1 --device cpu --warmup 1
    --no-progress --logs "$logs")
"$bin" "${common[@]}" --name one --batch-size 4 >/dev/null
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe --bind-to none -np 2 \
    -x RAYON_NUM_THREADS=1 "$bin" "${common[@]}" --name two --batch-size 2 --gather-with-grad >/dev/null
python3 - "$logs" <<'PY'
import json, statistics, sys
for run, what in [("one", "1 process, batch 4"), ("two", "2 ranks x batch 2")]:
    times = [json.loads(l)["time_s"] for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl") if '"loss"' in l]
    steps = [b - a for a, b in zip(times, times[1:])]
    print(f"{what}: median {statistics.median(steps):.3f} s/step, range {min(steps):.3f}-{max(steps):.3f} ({len(steps)} steps)")
PY
