"""Summarises the runs of run.sh: mean ± std over seeds of the final held-out metrics per
(dataset, masking), from each run's metrics.jsonl. Standard library only.
Usage: python3 benches/results/experiment/table.py LOGS"""
import json
import os
import platform
import statistics
import subprocess
import sys

METRICS = [("zeroshot_top1", "zero-shot top-1"), ("image_to_text_R@1", "I→T R@1"), ("text_to_image_R@1", "T→I R@1"),
           ("compositionality", "compositionality"), ("robust_noise_top1", "noise top-1")]


def final_record(path):
    last = None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "eval" in r:
                last = r
    return last


def main(logs):
    rows = {}
    for dataset in sorted(os.listdir(logs)):
        for run in sorted(os.listdir(os.path.join(logs, dataset))):
            path = os.path.join(logs, dataset, run, "metrics.jsonl")
            if not os.path.exists(path):
                continue
            r = final_record(path)
            if r is None:
                continue
            masking = run.rsplit("-seed", 1)[0][len(dataset) + 1:]
            rows.setdefault((dataset, masking), []).append(r)
    commit = os.environ.get("EXPERIMENT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print("# PGS at small scale: none vs FLIP vs PGS, same budget\n")
    print(f"- device: {cpu}, {os.cpu_count()} logical CPUs (CPU device, f32)")
    print(f"- commit: {commit}")
    print("- command: `bash benches/results/experiment/run.sh` (budget per run: 2 epochs × 3200 samples, batch 64 (100 steps);"
          " evaluation on 500 held-out samples)")
    print("- values: mean ± standard deviation over seeds (n per row in the last column); chance: shapes 2.5%"
          " (40 colour-shape classes), Fashion-MNIST 10%\n")
    header = "| dataset | masking | " + " | ".join(n for _, n in METRICS) + " | wall time (s) | seeds |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (dataset, masking), records in rows.items():
        cells = []
        for key, _ in METRICS:
            values = [100 * r["eval"][key] for r in records if key in r["eval"]]
            if not values:
                cells.append("–")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        wall = [r.get("time_s", float("nan")) for r in records]
        cells.append(f"{statistics.mean(wall):.0f}")
        print(f"| {dataset} | {masking} | " + " | ".join(cells) + f" | {len(records)} |")


if __name__ == "__main__":
    main(sys.argv[1])
