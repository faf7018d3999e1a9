"""KFP v2 components: one per pipeline step, each a thin typed wrapper around one function here —
runtime.py's step adapters (validate, stats, train, evaluate: one `yolo` CLI call each), datasets.py
(resolve the source's version, import it), registry.py (promote).

Importing this package does not import kfp; the component modules (`components.validate`, ...) do.
Every component runs in the project image: `YOLO_PIPELINE_IMAGE` (read when the component modules are
first imported) or DEFAULT_IMAGE.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/yolo-pipeline/yolo-pipeline:latest"


def pipeline_image() -> str:
    """The container image the components run in."""
    return os.environ.get("YOLO_PIPELINE_IMAGE") or DEFAULT_IMAGE
