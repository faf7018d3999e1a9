"""The image-size rule, one behaviour everywhere a size decides recorded numbers: it must be a multiple of
the model's largest stride, or the step refuses it in one line (exit 2).

Train, evaluate and the pipeline's parameter check (components/params.py) call `require_stride_multiple`.
Rounding the size up instead, as upstream val.py does, would record metrics for a size nobody asked for
and make two runs with "the same" --imgsz differ. predict and export keep upstream detect.py/export.py's
rounding with a warning (`yolo.predict.check_img_size`): their outputs are drawn boxes and a model file,
not numbers that are compared across runs.
"""

from __future__ import annotations

from yolo.errors import UserError

MAX_STRIDE = 32  # the largest stride of the P5 models (P6 models have 64: checked once the model is built)


def require_stride_multiple(imgsz: int, stride: int = MAX_STRIDE, flag: str = "--imgsz") -> int:
    """`imgsz` when it is a positive multiple of `stride`; otherwise UserError naming the nearest sizes."""
    if imgsz <= 0 or imgsz % stride:
        below = max(stride, imgsz // stride * stride)
        raise UserError(f"{flag} {imgsz} must be a multiple of the model's max stride {stride} "
                        f"(e.g. {below} or {below + stride})")
    return imgsz
