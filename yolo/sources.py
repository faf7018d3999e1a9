"""predict's `--source`: what the string names, and the frames it yields (upstream detect.py's sources).

- an image or a video file; a folder (its images and videos, sorted, no recursion); a glob (`'dir/*.jpg'`,
  quoted so the shell leaves it alone); a `.txt` list with one of those per line;
- an http(s) URL whose path ends in an image or video suffix: downloaded once into the cache
  (yolo.model.download: timeouts, one-line failure when offline), then read as a file;
- a webcam index (`0`) or a stream URL (rtsp://, rtmp://, or http(s) without a media suffix): read with
  OpenCV until the stream ends (or Ctrl-C).

The source stays a string until it is classified: pathlib would fold `https://` into `https:/`.
"""

from __future__ import annotations

import glob
import logging
import math
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from yolo.data.dataset import IMG_FORMATS
from yolo.data.image import read_image
from yolo.errors import UserError

LOG = logging.getLogger(__name__)
VID_FORMATS = frozenset({"asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv"})
STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")
OPEN_TIMEOUT_MS = 10_000  # a stream that does not answer fails within this, not never
DEFAULT_FPS = 30.0  # when a video or stream does not report a usable frame rate


@dataclass(frozen=True)
class VideoInfo:
    """The annotated video a video file or stream becomes."""

    name: str  # output file name, always .mp4 (as upstream)
    fps: float  # source fps / vid_stride, so the annotated video lasts as long as the source
    frames: int  # frames in the source; 0 when unknown (streams)


@dataclass(frozen=True)
class Frame:
    image: np.ndarray | None  # BGR uint8 HxWx3; None when the file cannot be decoded
    origin: str  # the file or URL it came from, for messages
    name: str  # output name: the image's file name, or the annotated video's
    label_stem: str  # labels/<label_stem>.txt: the image's stem, or `<video stem>_<frame>`
    frame: int | None = None  # 1-based frame number within a video or stream
    video: VideoInfo | None = None


def is_media(path: Path) -> bool:
    return path.suffix[1:].lower() in IMG_FORMATS | VID_FORMATS


def _is_video(path: Path) -> bool:
    return path.suffix[1:].lower() in VID_FORMATS


def list_media(source: Path) -> list[Path]:
    """One image or video, or a folder's images and videos sorted by path (no recursion), as detect.py."""
    if source.is_dir():
        files = sorted(source.glob("*.*"), key=lambda p: str(p))
        # glob.glob('*.*') as upstream lists it: no hidden files (e.g. macOS '._x.jpg' resource forks)
        media = [p for p in files if p.is_file() and not p.name.startswith(".") and is_media(p)]
        if not media:
            raise UserError(f"--source {source}: no images found, nor videos (looked for "
                            f"{', '.join(sorted(IMG_FORMATS | VID_FORMATS))})")
        return media
    if source.is_file():
        if not is_media(source):
            raise UserError(f"--source {source} is not an image or a video (supported: "
                            f"{', '.join(sorted(IMG_FORMATS | VID_FORMATS))})")
        return [source]
    raise UserError(f"--source {source} does not exist")


def _glob(pattern: str, where: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    media = [p for p in files if p.is_file() and is_media(p)]
    if not media:
        raise UserError(f"{where}: the pattern {pattern!r} matches no images or videos")
    return media


def _from_list(list_file: Path) -> list[Path]:
    """A .txt list: one image, video, folder or glob per line, relative paths from the current folder as
    upstream reads them; blank lines skipped."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--source {list_file}: cannot read the list: {e}") from None
    files: list[Path] = []
    for n, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry:
            continue
        if "*" in entry:
            files += _glob(entry, f"--source {list_file} line {n}")
        elif Path(entry).is_dir() or (Path(entry).is_file() and is_media(Path(entry))):
            files += list_media(Path(entry))
        else:
            raise UserError(f"--source {list_file} is a list of sources, but line {n} ({entry!r}) is not an image, "
                            "video, folder or glob that exists")
    if not files:
        raise UserError(f"--source {list_file}: the list names no images or videos")
    return files


def _url_media_path(url: str) -> Path | None:
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return path if is_media(path) else None


class Source:
    """The frames of a --source: still images, video files, or one live stream (webcam or URL)."""

    def __init__(self, files: list[Path] | None = None, stream: str | int | None = None, vid_stride: int = 1):
        if vid_stride < 1:
            raise UserError(f"--vid-stride must be >= 1, got {vid_stride}")
        self.files = files or []
        self.stream = stream
        self.vid_stride = vid_stride
        self._capture: cv2.VideoCapture | None = None
        if stream is not None:
            self._capture = _open_stream(stream)

    def __len__(self) -> int:
        """Files to read (a stream counts as one)."""
        return len(self.files) if self.stream is None else 1

    def __iter__(self) -> Iterator[Frame]:
        if self.stream is not None:
            yield from self._stream_frames()
            return
        for path in self.files:
            if _is_video(path):
                yield from self._video_frames(path)
            else:
                yield Frame(read_image(path), str(path), path.name, path.stem)

    def _video_frames(self, path: Path) -> Iterator[Frame]:
        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                yield Frame(None, str(path), path.name, path.stem)
                return
            total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
            video = VideoInfo(f"{path.stem}.mp4", _fps(capture) / self.vid_stride, total)
            yield from self._read(capture, str(path), path.stem, video)
        finally:
            capture.release()

    def _stream_frames(self) -> Iterator[Frame]:
        assert self._capture is not None
        stem = _stream_stem(self.stream)
        video = VideoInfo(f"{stem}.mp4", _fps(self._capture) / self.vid_stride, 0)
        try:
            yield from self._read(self._capture, str(self.stream), stem, video)
        finally:
            self._capture.release()

    def _read(self, capture: cv2.VideoCapture, origin: str, stem: str, video: VideoInfo) -> Iterator[Frame]:
        """Frames 1, 1+s, 1+2s, ... (s = vid_stride); the ones between are grabbed, not decoded."""
        index = 0
        while True:
            if index % self.vid_stride:
                if not capture.grab():
                    return
            else:
                ok, image = capture.read()
                if not ok or image is None:
                    return
                yield Frame(image, origin, video.name, f"{stem}_{index + 1}", index + 1, video)
            index += 1


def _fps(capture: cv2.VideoCapture) -> float:
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if math.isfinite(fps) and 0 < fps <= 240 else DEFAULT_FPS


def _stream_stem(stream: str | int) -> str:
    if isinstance(stream, int):
        return f"webcam{stream}"
    parts = urllib.parse.urlsplit(stream)
    name = Path(parts.path).name or parts.hostname or "stream"
    return re.sub(r"[^\w.-]", "_", name).lstrip(".") or "stream"


def _open_stream(stream: str | int) -> cv2.VideoCapture:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS]
    what = f"webcam {stream}" if isinstance(stream, int) else f"stream {stream}"
    try:
        if isinstance(stream, int):
            capture = cv2.VideoCapture(stream, cv2.CAP_ANY, params)
        else:
            capture = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, params)
    except cv2.error as e:
        raise UserError(f"--source: OpenCV cannot open {what}: {str(e).strip().splitlines()[-1][:160]}") from None
    if not capture.isOpened():
        capture.release()
        hint = "no such camera on this machine?" if isinstance(stream, int) else "unreachable, or a format FFmpeg cannot read"
        raise UserError(f"--source: OpenCV cannot open {what} ({hint})")
    return capture


def open_source(spec: str, vid_stride: int = 1) -> Source:
    """Classify --source (see the module doc) and return its frames; one-line UserErrors for what is not there."""
    spec = str(spec)
    if not spec:
        raise UserError("--source is empty")
    if spec.isdigit():
        return Source(stream=int(spec), vid_stride=vid_stride)
    lowered = spec.lower()
    if lowered.startswith(STREAM_SCHEMES):
        if lowered.startswith(("http://", "https://")) and _url_media_path(spec):
            from yolo.model.download import download

            return Source(files=[download(spec, kind="sources")], vid_stride=vid_stride)
        return Source(stream=spec, vid_stride=vid_stride)
    if "://" in spec:
        raise UserError(f"--source {spec}: unsupported URL scheme (use http(s)://, rtsp:// or rtmp://)")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".txt" and path.is_file():
        return Source(files=_from_list(path), vid_stride=vid_stride)
    if "*" in spec:
        return Source(files=_glob(spec, f"--source {spec}"), vid_stride=vid_stride)
    return Source(files=list_media(path), vid_stride=vid_stride)
