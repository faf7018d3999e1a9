#!/usr/bin/env bash
# GPU check of the train and evaluate steps: AMP, 640 px, batch 64, coco128, 3 epochs, then evaluate.
# Prints images/s, data-wait share and peak GPU memory. Offline and self-contained: a GPU machine may have
# an older torch (>= 2.11) and no boto3/kfp/dvc (the train/evaluate steps import none of them here), cannot
# install anything, and does not see ../shared. So the caller fills a git-ignored folder first:
#
#   mkdir -p gpu_assets && cp -r ../shared/datasets/coco128 gpu_assets/ && cp ../shared/weights/yolov5n.pt gpu_assets/
#   bash bench/gpu_check.sh            # or: PYTHON=/path/to/python bash bench/gpu_check.sh gpu_assets 0
#
# Budget: well under 5 minutes on one H100 (coco128 is 128 images; most of the time is start-up).
set -euo pipefail
cd "$(dirname "$0")/.."

ASSETS="${1:-gpu_assets}"
DEVICE="${2:-0}"
PY="${PYTHON:-python3}"
# Smoke-testing the script itself on a CPU: IMGSZ=64 BATCH=8 EPOCHS=1 ALLOW_CPU=1 bash bench/gpu_check.sh DIR cpu
IMGSZ="${IMGSZ:-640}"
BATCH="${BATCH:-64}"
EPOCHS="${EPOCHS:-3}"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
DATA="$ASSETS/coco128/data.yaml"
WEIGHTS="$ASSETS/yolov5n.pt"

for f in "$DATA" "$WEIGHTS"; do
  [ -f "$f" ] || { echo "gpu_check: missing $f (copy it from ../shared, see the header of $0)" >&2; exit 2; }
done

ALLOW_CPU="${ALLOW_CPU:-0}" "$PY" - <<'EOF'
import os, sys, torch
if not torch.cuda.is_available():
    if os.environ["ALLOW_CPU"] != "1":
        sys.exit("gpu_check: torch.cuda.is_available() is False on this machine")
    print(f"torch {torch.__version__}, no CUDA (ALLOW_CPU=1 smoke test)")
else:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

WORKERS="$("$PY" -c 'import os; print(min(8, len(os.sched_getaffinity(0))))')"
echo "== train: yolov5n from $WEIGHTS, coco128 @$IMGSZ, batch $BATCH, $EPOCHS epochs, AMP, $WORKERS workers -> $OUT/train"
t0=$(date +%s)
"$PY" -m yolo train --data "$DATA" --weights "$WEIGHTS" --imgsz "$IMGSZ" --batch-size "$BATCH" --epochs "$EPOCHS" \
  --device "$DEVICE" --workers "$WORKERS" --out "$OUT/train" 2> >(grep -v 'it/s]' >&2)
t1=$(date +%s)
echo "== evaluate: best.pt on coco128 val @$IMGSZ, batch 32 -> $OUT/eval"
"$PY" -m yolo evaluate --data "$DATA" --weights "$OUT/train/weights/best.pt" --imgsz "$IMGSZ" --batch-size 32 \
  --device "$DEVICE" --out "$OUT/eval"
t2=$(date +%s)

"$PY" - "$OUT" "$((t1 - t0))" "$((t2 - t1))" <<'EOF'
import csv, json, sys
out, train_s, eval_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
doc = json.load(open(f"{out}/train/train.json"))
rows = list(csv.DictReader(open(f"{out}/train/results.csv")))
metrics = json.load(open(f"{out}/eval/metrics.json"))
print("\n== gpu_check summary")
for r in rows:
    print(f"epoch {r['epoch']}: {float(r['images_per_s']):.1f} img/s, data wait {100 * float(r['data_wait_share']):.0f}%,"
          f" {float(r['seconds']):.1f}s")
print(f"train: {doc['images_per_s']:.1f} img/s over all epochs, data wait {100 * doc['data_wait_share']:.0f}%, "
      f"peak GPU memory {doc.get('peak_gpu_memory_gb') or float('nan'):.2f} GB, step wall {train_s}s")
print(f"train final (EMA, in-training val): mAP50 {doc['final']['map50']:.4f}, mAP50-95 {doc['final']['map50_95']:.4f}")
speed = metrics["speed_ms"]
print(f"evaluate: mAP50 {metrics['map50']:.4f}, mAP50-95 {metrics['map50_95']:.4f}; per image "
      f"{speed['preprocess']:.2f} ms pre, {speed['inference']:.2f} ms inference, {speed['nms']:.2f} ms NMS; "
      f"step wall {eval_s}s")
EOF
