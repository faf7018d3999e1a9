"""Time the YOLOv5 loss and NMS on realistic shapes (yolov5n heads, coco-like targets).

    .venv/bin/python bench/loss_nms.py [--repeats 20]

Loss: batch 16 at 320 px, 7 targets per image (coco128's mean), forward of the loss and its backward
through the prediction maps only (not the network). NMS: val settings (conf 0.001, iou 0.6, multi-label)
and predict settings (conf 0.25, iou 0.45) on the official yolov5n's predictions for 8 coco128 val images
at 640 (random predictions would be meaningless: their candidate counts are nothing like a trained model's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from yolo.boxes import non_max_suppression
from yolo.hyp import Hyp
from yolo.loss import YoloLoss, scale_loss_gains
from yolo.model import DetectionModel, load_cfg


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DetectionModel(load_cfg("yolov5n.yaml")).train()
    head = model.model[-1]
    bs, imgsz, per_image = 16, 320, 7
    maps = [torch.randn(bs, head.na, imgsz // int(s), imgsz // int(s), head.no) for s in head.stride]
    n = bs * per_image
    targets = torch.cat(
        (
            torch.arange(bs).repeat_interleave(per_image)[:, None].float(),
            torch.randint(0, 80, (n, 1)).float(),
            torch.rand(n, 2),
            torch.rand(n, 2) * 0.4 + 0.02,
        ),
        1,
    )
    loss = YoloLoss(model, scale_loss_gains(Hyp(), head.nl, head.nc, imgsz))

    def loss_forward():
        loss(maps, targets)

    leaf = [m.clone().requires_grad_() for m in maps]

    def loss_forward_backward():
        loss(leaf, targets)[0].backward()

    print(f"loss forward, bs {bs} @ {imgsz}, {n} targets: {_median_ms(loss_forward, args.repeats):.1f} ms")
    print(f"loss forward+backward (maps only): {_median_ms(loss_forward_backward, args.repeats):.1f} ms")

    # NMS on what the official yolov5n predicts for real coco128 images at 640 (skipped without ../shared)
    shared = Path(__file__).resolve().parents[1].parent / "shared"
    weights, images = shared / "weights" / "yolov5n.pt", shared / "datasets" / "coco128" / "images" / "val2017"
    if not weights.exists() or not images.exists():
        print("NMS: ../shared weights or coco128 missing, skipped")
        return
    from yolo.data.image import letterbox, read_image
    from yolo.model.checkpoint import load_model

    detector, _ = load_model(weights, torch.device("cpu"), fuse=True)
    batch = []
    for path in sorted(images.glob("*.jpg"))[:8]:
        im = letterbox(read_image(path), 640, auto=False)[0][:, :, ::-1].transpose(2, 0, 1)
        batch.append(torch.from_numpy(im.copy()).float() / 255)
    with torch.inference_mode():
        pred = detector(torch.stack(batch))[0]
    nb = len(batch)

    def nms_val():
        non_max_suppression(pred, 0.001, 0.6, multi_label=True, max_det=300)

    def nms_predict():
        non_max_suppression(pred, 0.25, 0.45, max_det=1000)

    print(f"NMS val settings (conf 0.001, iou 0.6, multi-label), per image: {_median_ms(nms_val, args.repeats) / nb:.2f} ms")
    print(f"NMS predict settings (conf 0.25, iou 0.45), per image: {_median_ms(nms_predict, args.repeats) / nb:.2f} ms")

if __name__ == "__main__":
    main()
