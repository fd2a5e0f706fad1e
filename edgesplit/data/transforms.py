"""Deterministic eval preprocessing with numpy + Pillow (no torch), as the bundle's input spec says.

Train-time augmentation lives in the build plane (:mod:`edgesplit.builder.augment`), on tensors.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise ValueError(f"not a decodable image ({len(data)} bytes): {e}") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_center_crop(img: Image.Image, resize: int, crop: int) -> Image.Image:
    """Resize the shorter side to ``resize`` then take the centre ``crop`` square."""
    w, h = img.size
    if min(w, h) != resize:
        s = resize / min(w, h)
        img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
        w, h = img.size
    if (w, h) != (crop, crop):
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
    return img


def to_uint8_hwc(data: bytes, resize: int, crop: int) -> np.ndarray:
    return np.asarray(resize_center_crop(decode_rgb(data), resize, crop), dtype=np.uint8)


def normalize_chw(hwc: np.ndarray, mean, std) -> np.ndarray:
    x = hwc.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(data: bytes, input_spec: dict) -> np.ndarray:
    """Encoded image -> float32 CHW tensor as the bundle's ``input`` spec describes."""
    size = int(input_spec["shape"][-1])
    resize = int(input_spec.get("resize", size))
    return normalize_chw(to_uint8_hwc(data, resize, size), input_spec["mean"], input_spec["std"])


def reencode_jpeg(data: bytes, side: int, quality: int) -> bytes:
    """The "send the JPEG instead" baseline: downscale to ``side`` and re-encode at ``quality``."""
    img = decode_rgb(data)
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality), optimize=True)
    return buf.getvalue()
