"""yolo-pipeline: YOLOv5 training as reproducible pipeline steps (validate, stats, train, evaluate)."""

__version__ = "0.1.0"
