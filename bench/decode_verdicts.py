"""Does a 1/8-scale JPEG decode reject exactly the files a full decode rejects? (validate's image check)

    .venv/bin/python bench/decode_verdicts.py [--images 80]

`yolo-pipeline validate` decodes every JPEG with OpenCV's IMREAD_REDUCED_COLOR_8 (libjpeg's DCT scaling:
every entropy-coded block is still decoded, the full-size inverse DCT and colour conversion are not) and
promises that an image it accepts also loads at full size. This corrupts real JPEGs (coco128, as stored,
re-encoded progressive, and grayscale) in 18 ways each: truncations from 5% to 99% and inside the first
scan's header, 1/5/50 random bytes in the scan, 1/5 random bytes in the headers, 4 KB zeroed or random,
garbage after the end, the end marker removed. It counts (full verdict, 1/8 verdict) per kind and
prints any file where one decodes and the other does not: there must be none.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco128" / "images"
ENCODINGS = ("as stored", "progressive", "grayscale")


def decodes(data: bytes, flag: int) -> bool:
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flag) is not None
    except cv2.error:
        return False


def encoded(data: bytes, encoding: str) -> bytes:
    if encoding == "as stored":
        return data
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if encoding == "grayscale":
        im = cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(encoding == "progressive")]
    return cv2.imencode(".jpg", im, params)[1].tobytes()


def corrupted(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(kind, bytes) variants of one JPEG."""
    n = len(data)
    scan = max(data.find(b"\xff\xda"), 20)  # the first start-of-scan marker
    out = [(f"truncated at {f:.0%}", data[: int(n * f)]) for f in (0.05, 0.2, 0.5, 0.8, 0.95, 0.99)]
    out.append(("truncated in the scan header", data[: scan + 5]))

    def flipped(k: int, low: int, high: int) -> bytes:
        b = bytearray(data)
        for p in rng.integers(low, high, k):
            b[p] = int(rng.integers(0, 256))
        return bytes(b)

    out += [(f"{k} random bytes in the scan", flipped(k, scan + 20, n - 2)) for k in (1, 5, 50)]
    out += [(f"{k} random bytes in the headers", flipped(k, 2, scan)) for k in (1, 5)]
    for kind, fill in (("4 KB zeroed", lambda: bytes(4096)),
                       ("4 KB random", lambda: rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())):
        b = bytearray(data)
        p = int(rng.integers(scan + 20, max(scan + 21, n - 5000)))
        b[p: p + 4096] = fill()
        out.append((kind, bytes(b[:n])))
    out.append(("garbage after the end", data + rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()))
    out.append(("end marker removed", data[:-2]))
    return out


def study(files: list[Path], seed: int = 0) -> tuple[collections.Counter, list[tuple[str, str, str]]]:
    """(counts per (encoding, kind, full decodes, 1/8 decodes), the disagreements)."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng(seed)
    counts: collections.Counter = collections.Counter()
    disagree = []
    for path in files:
        raw = path.read_bytes()
        for encoding in ENCODINGS:
            for kind, data in corrupted(encoded(raw, encoding), rng):
                full, eighth = decodes(data, cv2.IMREAD_COLOR), decodes(data, cv2.IMREAD_REDUCED_COLOR_8)
                counts[(encoding, kind, full, eighth)] += 1
                if full != eighth:
                    disagree.append((path.name, encoding, kind))
    return counts, disagree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--folder", type=Path, default=SHARED)
    args = ap.parse_args()
    files = sorted(args.folder.rglob("*.jpg"))[: args.images]
    counts, disagree = study(files)
    print(f"{len(files)} JPEGs x {len(ENCODINGS)} encodings, {sum(counts.values())} corrupted files")
    print("| encoding | corruption | files | full decode ok | 1/8 decode ok |\n|---|---|---|---|---|")
    rows: dict = collections.defaultdict(lambda: [0, 0, 0])
    for (encoding, kind, full, eighth), n in counts.items():
        row = rows[(encoding, kind)]
        row[0] += n
        row[1] += n * full
        row[2] += n * eighth
    for (encoding, kind), (n, full, eighth) in rows.items():
        print(f"| {encoding} | {kind} | {n} | {full} | {eighth} |")
    print(f"disagreements: {len(disagree)}", *disagree[:20], sep="\n")


if __name__ == "__main__":
    main()
