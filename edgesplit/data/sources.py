"""Frame sources shared by every plane (no torch): WebDataset tar shards, image folders, single
images, video files and cameras (OpenCV, optional).

A source yields :class:`Sample` objects carrying the *encoded* image bytes, so the agent can report
the JPEG size of its input and the "send the JPEG" baseline can re-encode from the original.
"""

from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


class SourceError(Exception):
    """A frame source that cannot be opened or read."""


@dataclass
class Sample:
    key: str
    data: bytes  # encoded image (JPEG/PNG/...) or, for video frames, a JPEG made from the frame
    label: int | None = None


def data_root() -> Path:
    """Where shared data lives: ``$EDGESPLIT_DATA``, else ``../shared/data`` from the project or cwd."""
    env = os.environ.get("EDGESPLIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # the project root when installed in editable mode
    for base in (here, Path.cwd()):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


# Named datasets: the shard files of each split, relative to data_root().
DATASETS = {
    "cifar10": {"train": "cifar10-jpeg/train-*.tar.gz", "test": "cifar10-jpeg/test-*.tar.gz"},
    "imagenette": {"train": "imagenette-224/train-*.tar.gz", "val": "imagenette-224/val-*.tar.gz"},
}
CLASSES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "imagenette": [
        "tench",
        "English springer",
        "cassette player",
        "chain saw",
        "church",
        "French horn",
        "garbage truck",
        "gas pump",
        "golf ball",
        "parachute",
    ],
}


def dataset_shards(name: str, split: str) -> list[Path]:
    """Shard paths of a named dataset split, e.g. ``dataset_shards('cifar10', 'test')``."""
    try:
        pattern = DATASETS[name][split]
    except KeyError:
        known = ", ".join(f"{n}:{s}" for n, d in DATASETS.items() for s in d)
        raise SourceError(f"unknown dataset '{name}:{split}' (known: {known})") from None
    shards = sorted(Path(p) for p in glob.glob(str(data_root() / pattern)))
    if not shards:
        raise SourceError(f"no shards for {name}:{split} under {data_root()} (set EDGESPLIT_DATA)")
    return shards


def iter_tar_shards(paths: list[Path]) -> Iterator[Sample]:
    """Yield samples from WebDataset shards: members ``KEY.jpg`` + ``KEY.cls`` share a key."""
    for path in paths:
        try:
            tf = tarfile.open(path, "r:*")
        except (OSError, tarfile.TarError) as e:
            raise SourceError(f"{path}: not a readable tar shard: {e}") from None
        with tf:
            pending: dict[str, dict[str, bytes]] = {}
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = Path(m.name).name.partition(".")
                f = tf.extractfile(m)
                if f is None:
                    continue
                parts = pending.setdefault(key, {})
                parts[ext.lower()] = f.read()
                sample = _complete(key, parts)
                if sample is not None:
                    del pending[key]
                    yield sample
            for key, parts in pending.items():  # images whose label never came: unlabelled
                img = _image_part(parts)
                if img is not None:
                    yield Sample(key, img, None)


def _image_part(parts: dict[str, bytes]) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in parts:
            return parts[ext]
    return None


def _complete(key: str, parts: dict[str, bytes]) -> Sample | None:
    img = _image_part(parts)
    if img is None or "cls" not in parts:
        return None
    try:
        label = int(parts["cls"].decode().strip())
    except ValueError:
        raise SourceError(f"sample '{key}': .cls is not an integer: {parts['cls'][:20]!r}") from None
    return Sample(key, img, label)


def iter_image_folder(root: Path, classes: list[str] | None = None) -> Iterator[Sample]:
    """Images under ``root``; in ``root/CLASS/img.jpg`` layouts the label is the folder's index
    in ``classes`` (or in the sorted folder names when ``classes`` is not given)."""
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    names = classes or subdirs
    index = {n: i for i, n in enumerate(names)}
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    for p in files:
        rel = p.relative_to(root)
        label = index.get(rel.parts[0]) if len(rel.parts) > 1 else None
        yield Sample(str(rel.with_suffix("")), p.read_bytes(), label)


def iter_video(path: str | int, limit: int | None = None) -> Iterator[Sample]:
    """Frames of a video file or camera index, JPEG-encoded (quality 95) so they flow like files."""
    try:
        import cv2
    except ImportError:
        raise SourceError("video and camera sources need OpenCV: pip install 'edgesplit[video]'") from None
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise SourceError(f"cannot open video source {path!r}")
    i = 0
    try:
        while limit is None or i < limit:
            ok, frame = cap.read()
            if not ok:
                break
            ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if ok:
                yield Sample(f"frame-{i:06d}", buf.tobytes(), None)
            i += 1
    finally:
        cap.release()


def open_source(spec: str, classes: list[str] | None = None) -> Iterator[Sample]:
    """Open a frame source from a string: ``dataset:split`` (e.g. ``cifar10:test``), a shard file or
    glob, a folder of shards or images, one image, a video file, or ``camera:N``."""
    if spec.startswith("camera:"):
        return iter_video(int(spec.split(":", 1)[1]))
    name, _, split = spec.partition(":")
    if name in DATASETS and split:
        return iter_tar_shards(dataset_shards(name, split))
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec))
        if not paths:
            raise SourceError(f"no files match {spec!r}")
        return iter_tar_shards(paths)
    p = Path(spec)
    if not p.exists():
        raise SourceError(f"frame source {spec!r} does not exist")
    if p.is_dir():
        shards = sorted(list(p.glob("*.tar")) + list(p.glob("*.tar.gz")))
        return iter_tar_shards(shards) if shards else iter_image_folder(p, classes)
    if p.name.endswith((".tar", ".tar.gz", ".tgz")):
        return iter_tar_shards([p])
    if p.suffix.lower() in VIDEO_EXTS:
        return iter_video(str(p))
    if p.suffix.lower() in IMAGE_EXTS:
        return iter([Sample(p.stem, p.read_bytes(), None)])
    raise SourceError(f"cannot tell what kind of frame source {spec!r} is")


def take(it: Iterator[Sample], n: int | None) -> Iterator[Sample]:
    for i, s in enumerate(it):
        if n is not None and i >= n:
            return
        yield s
