#!/usr/bin/env bash
# The thread rule under a high load average: evaluate on a quiet machine, then again right after a 2-core
# CPU burner ran for 90 s (the 1-minute load average is >= 2 but the cores are idle again). Same thread
# count (metrics.json cpu_threads) and about the same time are expected: threads follow the CPUs given,
# never the load average.
#   bash bench/after_load.sh [DATA_YAML] [WEIGHTS]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/datasets/coco128/data.yaml}
weights=${2:-../shared/weights/yolov5n.pt}
out=$(mktemp -d)
run() {  # $1: label
    local load start end
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s.%N)
    .venv/bin/yolo-pipeline evaluate --data "$data" --weights "$weights" --out "$out/$1" >/dev/null 2>&1
    end=$(date +%s.%N)
    python3 -c "import json; m = json.load(open('$out/$1/metrics.json')); print(f'$1: {$end - $start:.2f} s, load average before {$load}, cpu_threads {m[\"cpu_threads\"]}, mAP50 {m[\"map50\"]:.6f}')"
}
run quiet1
run quiet2
for _ in 1 2; do timeout 90 sh -c 'while :; do :; done' & done
wait
run after-burner
rm -rf "$out"
