"""Every budget an input must fit before anything is allocated for it, in one place.

An input is a file a user (or an attacker with control of one input) hands a step: data.yaml, a hyp or
model cfg, a checkpoint, an image, a label file. Each number is far above what real inputs need and
far below what exhausts a machine; going over one is a user error in one line (exit 2), or a coded
problem in validate's report. yolo/untrusted.py applies the file, yaml and data-tree limits.
"""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------------------------- yaml files
# data.yaml, hyp and model cfg files. The largest upstream data.yaml (Objects365, with its download
# script) is about 20 KB; a yolov5x6 cfg is 2 KB.
MAX_YAML_BYTES = 1 * MiB
# Nodes after expanding aliases (a shared node counts once per use). 10 000 class names are 10 000
# nodes; a model cfg is about 300. A "billion laughs" file of a few hundred bytes expands to 10^9.
MAX_YAML_NODES = 200_000
# Nesting depth of yaml and of the plain data inside checkpoints (a cfg is 5 deep: mapping, section,
# layer row, args, anchor row). Deeper nesting only exists to exhaust the recursion of a parser.
MAX_DATA_DEPTH = 32

# ---------------------------------------------------------------------------------------------- classes
# LVIS has 1203 classes, Open Images 601. 10 000 keeps the Detect head of yolov5x under 0.3 GB (fp32)
# while an `nc: 1000000000000` of a few bytes would ask for terabytes.
MAX_CLASSES = 10_000

# ---------------------------------------------------------------------------------------------- model cfg
# Official cfgs have 25-34 layer rows, repeats up to 9 x 1.33 and widths up to 1280 (yolov5x6).
MAX_CFG_LAYERS = 512
MAX_LAYER_REPEATS = 128  # after depth_multiple
MAX_CHANNELS = 8192  # after width_multiple: 6x yolov5x6's widest layer
MAX_ANCHORS_PER_LEVEL = 32  # upstream uses 3 (hyp `anchors` up to ~9); `anchors: 1000000000` is a list that long
# yolov5x6 has 141 M parameters; twice that is the largest model we build (1.1 GB fp32 before training).
MAX_PARAMETERS = 300_000_000
# Largest single feature map of the stride probe (a 256x256 input), in elements: yolov5x6's largest is
# 80 x 128 x 128 = 1.3 M. 64 M elements (256 MB fp32) is refused before a real forward runs; an
# `nn.Upsample` with a scale factor of 1000 would otherwise ask for GiBs.
MAX_FEATURE_ELEMENTS = 64_000_000

# ---------------------------------------------------------------------------------------------- checkpoints
# A yolov5x6 last.pt with EMA and optimizer state is about 1.7 GB; official .pt files are under 300 MB.
MAX_CHECKPOINT_BYTES = 4 * GiB
# torch.save writes one zip entry per storage (yolov5x: ~700) plus a few records.
MAX_CHECKPOINT_ENTRIES = 100_000
# Values in a checkpoint's plain data (dicts, lists, numbers; a tensor counts one): a yolov5x last.pt
# with optimizer state and training history has ~20 000.
MAX_CHECKPOINT_VALUES = 2_000_000
# The pickle itself (data.pkl) holds names and small records only; tensors live in their own entries.
# An official yolov5x data.pkl is ~100 KB.
MAX_PICKLE_BYTES = 64 * MiB

# ---------------------------------------------------------------------------------------------- dataset files
# Pixels an image may declare in its header. This is Pillow's decompression-bomb error threshold
# (2 x Image.MAX_IMAGE_PIXELS), which upstream YOLOv5's dataset check already applies when it opens each
# image with Pillow: every image upstream accepts is accepted here. Decoded as BGR it is 537 MB.
MAX_IMAGE_PIXELS = 178_956_970
# Bytes of one image file, read whole to hash and decode: an uncompressed 8-bit RGB BMP/TIFF at the
# pixel limit is 537 MB; compressed formats of that size are far smaller.
MAX_IMAGE_BYTES = 600 * MiB
# One label file: a box row is ~40 bytes; a polygon of 1000 points ~20 KB. 8 MiB is 200 000 boxes or
# 400 detailed polygons in one image; more is not a label file.
MAX_LABEL_BYTES = 8 * MiB
# A .txt list of a split's images: 2 M paths of 100 bytes.
MAX_IMAGE_LIST_BYTES = 256 * MiB
# Folders whose files are not data on a disk: reading them hangs (/dev/zero, a FIFO), never ends, or
# reports sizes that lie (/proc, /sys). A dataset root, a split source or any file that resolves into
# one of them is refused.
VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev")
