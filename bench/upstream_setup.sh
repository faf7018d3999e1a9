#!/usr/bin/env bash
# An upstream YOLOv5 checkout with its own venv, for bench/side_by_side.py. Offline here: the checkout comes
# from a local git directory or an archive of ultralytics/yolov5 (the figures in docs/benchmarks.md were
# taken against master 5081342, 2026-08-21), torch from this machine's pip (same 2.14.1 as ours), the rest
# from the package registry. Upstream downloads Arial.ttf on first plot; a local font stands in for it.
#   bash bench/upstream_setup.sh GIT_DIR_OR_TARBALL DEST
set -euo pipefail
src=$1 dest=$2
mkdir -p "$dest"
if [ -d "$src" ]; then git --git-dir="$src" archive HEAD | tar -x -C "$dest"; else tar -xf "$src" -C "$dest" --strip-components=1; fi
python3 -m venv "$dest/.venv"
"$dest/.venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$dest/.venv/bin/pip" install -q -r "$dest/requirements.txt"
font=$(find "$dest/.venv" -name DejaVuSans.ttf | head -1)
mkdir -p ~/.config/Ultralytics
cp -n "$font" ~/.config/Ultralytics/Arial.ttf
cp -n "$font" ~/.config/Ultralytics/Arial.Unicode.ttf
echo "upstream at $dest, python $dest/.venv/bin/python"
