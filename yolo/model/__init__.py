"""YOLOv5 models: cfgs, the builder, and checkpoints (ours and upstream's)."""

from yolo.model.cfg import load_cfg
from yolo.model.yolo import Detect, DetectionModel

__all__ = ["Detect", "DetectionModel", "load_cfg"]
