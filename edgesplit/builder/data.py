"""Training data for the build plane: whole splits decoded once into uint8 tensors (cached as
.npy), batches drawn and augmented on the training device itself so that a GPU never waits on
JPEG decoding. CIFAR-10 is 150 MB and Imagenette-224 1.4 GB as uint8: both fit in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import dataset_shards, iter_tar_shards
from ..data.transforms import to_uint8_hwc

# ImageNet channel statistics: every recipe normalises with them, and every bundle's input spec says so.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _decode_shard(args: tuple[str, int, int | None]) -> tuple[np.ndarray, np.ndarray]:
    path, size, limit = args
    imgs, labels = [], []
    for i, s in enumerate(iter_tar_shards([Path(path)])):
        if limit is not None and i >= limit:
            break
        imgs.append(to_uint8_hwc(s.data, size, size))
        labels.append(-1 if s.label is None else s.label)
    return np.stack(imgs), np.asarray(labels, np.int64)


def load_split(
    dataset: str,
    split: str,
    size: int,
    cache_dir: Path | None = None,
    limit_per_shard: int | None = None,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``dataset:split`` to uint8 NHWC at ``size``; cached on disk."""
    shards = dataset_shards(dataset, split)
    key = hashlib.sha1(f"{[str(s) for s in shards]}|{size}|{limit_per_shard}".encode()).hexdigest()[:12]
    if cache_dir is not None:
        x_path, y_path = cache_dir / f"{dataset}-{split}-{key}-x.npy", cache_dir / f"{dataset}-{split}-{key}-y.npy"
        if x_path.exists() and y_path.exists():
            return np.load(x_path), np.load(y_path)
    jobs = [(str(s), size, limit_per_shard) for s in shards]
    if workers and workers > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as ex:
            parts = list(ex.map(_decode_shard, jobs))
    else:
        parts = [_decode_shard(j) for j in jobs]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename: concurrent jobs sharing the cache never read a half-written file.
        for arr, dst in ((x, x_path), (y, y_path)):
            tmp = dst.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, dst)
    return x, y


class DeviceLoader:
    """Iterates normalised float batches from a uint8 NHWC array held on ``device``.

    ``augment``: None (eval), ``"crop_flip"`` (CIFAR: 4-pixel translation with zero padding +
    horizontal flip), ``"crop_flip_erase"`` (the same, then random erasing, Zhong et al. 2020: with
    probability 0.5 one rectangle of 2-25 % of the image, aspect 0.3-3.3, set to the mean) or
    ``"rrc_flip"`` (random-resized crop, scale 0.25-1, + flip), all done on whole batches.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch: int,
        device: torch.device,
        mean,
        std,
        augment: str | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.x = torch.from_numpy(x).to(device)  # N,H,W,C uint8
        self.y = torch.from_numpy(y).to(device)
        self.batch, self.device, self.augment, self.shuffle, self.drop_last = batch, device, augment, shuffle, drop_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.gen = torch.Generator(device=device).manual_seed(seed)
        if augment not in (None, "crop_flip", "crop_flip_erase", "rrc_flip"):
            raise ValueError(f"unknown augmentation '{augment}'")

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch if self.drop_last else math.ceil(n / self.batch)

    def __iter__(self):
        n = len(self.x)
        order = (
            torch.randperm(n, device=self.device, generator=self.gen)
            if self.shuffle
            else torch.arange(n, device=self.device)
        )
        for i in range(len(self)):
            idx = order[i * self.batch : (i + 1) * self.batch]
            xb = self.x[idx].permute(0, 3, 1, 2).float()
            if self.augment:
                xb = self._augment(xb)
            xb = (xb - self.mean) / self.std
            if self.augment == "crop_flip_erase":
                xb = self._erase(xb)
            xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        r = lambda *s: torch.rand(*s, device=dev, generator=self.gen)  # noqa: E731
        flip = torch.where(r(b) < 0.5, -1.0, 1.0)
        if self.augment in ("crop_flip", "crop_flip_erase"):
            sx = sy = torch.ones(b, device=dev)
            tx = torch.randint(-4, 5, (b,), device=dev, generator=self.gen).float() * 2 / w
            ty = torch.randint(-4, 5, (b,), device=dev, generator=self.gen).float() * 2 / h
            mode = "nearest"
        else:
            area = 0.25 + 0.75 * r(b)
            logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r(b)
            ratio = torch.exp(logr)
            sx = torch.sqrt(area * ratio).clamp(max=1.0)
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (1 - sx) * (2 * r(b) - 1)
            ty = (1 - sy) * (2 * r(b) - 1)
            mode = "bilinear"
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        grid = F.affine_grid(theta, (b, 3, h, w), align_corners=False)
        # Padding value: 0 in pixel space, as the reference CIFAR recipe pads with zeros.
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    def _erase(self, x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
        """Random erasing on a normalised batch: 0 is the mean colour."""
        b, _, h, w = x.shape
        dev = x.device
        r = lambda *s: torch.rand(*s, device=dev, generator=self.gen)  # noqa: E731
        area = (0.02 + 0.23 * r(b)) * h * w
        aspect = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * r(b))
        eh = torch.sqrt(area * aspect).clamp(1, h).floor()
        ew = torch.sqrt(area / aspect).clamp(1, w).floor()
        top = ((h - eh + 1) * r(b)).floor()
        left = ((w - ew + 1) * r(b)).floor()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (
            (rows >= top.view(b, 1, 1))
            & (rows < (top + eh).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1))
            & (cols < (left + ew).view(b, 1, 1))
        )
        erase = inside & (r(b) < p).view(b, 1, 1)
        return x.masked_fill(erase.unsqueeze(1), 0.0)
