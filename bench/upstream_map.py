"""Upstream YOLOv5's val.run in-process, printing mAP50 / mAP50-95 at full precision (val.py rounds to 3).

    UPSTREAM_PYTHON bench/upstream_map.py UPSTREAM_DIR DATA_YAML WEIGHTS [IMGSZ]

Run with upstream's own python (bench/upstream_setup.sh); compare with our metrics.json (docs/benchmarks.md).
"""

import sys

upstream, data, weights = sys.argv[1:4]
imgsz = int(sys.argv[4]) if len(sys.argv) > 4 else 640
sys.path.insert(0, upstream)
import val  # noqa: E402  (upstream's module, from its checkout)

# exactly what `python val.py ...` runs (parse_opt's defaults, then run), keeping run's return value
sys.argv = ["val.py", "--weights", weights, "--data", data, "--img", str(imgsz), "--batch-size", "32",
            "--device", "cpu", "--project", "/tmp/upstream_map", "--exist-ok"]
(mp, mr, map50, map50_95, *_), _, _ = val.run(**vars(val.parse_opt()))
print(f"upstream mAP50 {map50!r} mAP50-95 {map50_95!r} P {mp!r} R {mr!r}")
