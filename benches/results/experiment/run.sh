#!/usr/bin/env bash
# The paper's question at small scale: does PGS masking beat no masking and FLIP at the same
# budget? Two datasets (shapes: L = 64 patches; Fashion-MNIST at 28×28, patch 4: L = 49), five
# maskings, three seeds, the same samples and steps for every run. Writes the runs under $LOGS and
# the table to benches/results/experiment/table.md.
#   bash benches/results/experiment/run.sh            (about 20 minutes on 2 CPU cores)
# Fashion-MNIST needs the Debian package dataset-fashion-mnist (or DATA_FMNIST=fashion-mnist:DIR).
set -euo pipefail
cd "$(dirname "$0")/../../.."
LOGS=${LOGS:-target/experiment}
SEEDS=${SEEDS:-"0 1 2"}
DATA_FMNIST=${DATA_FMNIST:-fashion-mnist}
BUDGET=${BUDGET:-"--epochs 2 --train-num-samples 3200 --batch-size 64 --eval-samples 500"}
cargo build --release
for data in shapes "$DATA_FMNIST"; do
    tag=${data%%:*}
    for seed in $SEEDS; do
        for masking in "none" "flip 0.5" "pgs 0.5 paper" "pgs dynamic paper" "pgs 0.5 reference"; do
            set -- $masking
            args=(--mask "$1")
            name="$tag-$1"
            if [[ $# -ge 2 ]]; then args+=(--mask-ratio "$2"); name+="-$2"; fi
            if [[ $# -ge 3 ]]; then args+=(--pgs-mode "$3"); name+="-$3"; fi
            name+="-seed$seed"
            rm -rf "$LOGS/$tag/$name"
            echo "== $name"
            # shellcheck disable=SC2086
            ./target/release/clip-pgs train --data "$data" --seed "$seed" "${args[@]}" $BUDGET \
                --logs "$LOGS/$tag" --name "$name" --no-progress --save-frequency 0 | tail -n 3
        done
    done
done
python3 benches/results/experiment/table.py "$LOGS" > benches/results/experiment/table.md
cat benches/results/experiment/table.md
