"""Frame sources, eval preprocessing and the build plane's device-side loader, on real JPEGs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from build_fixtures import one_torch_thread  # noqa: F401  (autouse: single-threaded torch here)
from PIL import Image

from edgesplit.builder.data import DeviceLoader, load_split
from edgesplit.data.sources import (
    CLASSES,
    Sample,
    SourceError,
    data_root,
    dataset_shards,
    iter_image_folder,
    iter_tar_shards,
    open_source,
    take,
)
from edgesplit.data.transforms import decode_rgb, preprocess, reencode_jpeg

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JPEG_SOI = b"\xff\xd8\xff"


def shard(rel: str) -> Path:
    p = data_root() / rel
    if not p.is_file():
        pytest.fail(f"shared shard {p} not found (set EDGESPLIT_DATA)")
    return p


@pytest.fixture(scope="module")
def cifar_test_samples() -> list[Sample]:
    return list(take(iter_tar_shards([shard("cifar10-jpeg/test-00000.tar.gz")]), 200))


# -- WebDataset shards --------------------------------------------------------------------------


def test_cifar_shard_samples(cifar_test_samples):
    assert len(cifar_test_samples) == 200
    keys = [s.key for s in cifar_test_samples]
    assert len(set(keys)) == len(keys)
    for s in cifar_test_samples:
        assert isinstance(s.key, str) and s.data[:3] == JPEG_SOI
        assert isinstance(s.label, int) and 0 <= s.label < 10
        split, cls, idx = s.key.split("-")
        assert split == "test" and idx.isdigit()
        assert cls == CLASSES["cifar10"][s.label], s.key
        assert decode_rgb(s.data).size == (32, 32)
    assert len({s.label for s in cifar_test_samples}) == 10  # 200 shuffled frames cover every class


def test_cifar_train_shard_keys_match_labels():
    for s in take(iter_tar_shards([shard("cifar10-jpeg/train-00003.tar.gz")]), 100):
        assert s.key.startswith("train-")
        assert s.key.split("-")[1] == CLASSES["cifar10"][s.label]


def test_imagenette_shard_labels_match_wordnet_ids():
    csv_path = data_root() / "imagenette-224" / "classes.csv"
    if not csv_path.is_file():
        pytest.fail(f"{csv_path} not found (set EDGESPLIT_DATA)")
    rows = list(csv.DictReader(csv_path.open()))
    wnid = {int(r["label_index"]): r["wnid"] for r in rows}
    assert [r["name"] for r in sorted(rows, key=lambda r: int(r["label_index"]))] == CLASSES["imagenette"]
    samples = list(take(iter_tar_shards([shard("imagenette-224/val-00000.tar.gz")]), 12))
    assert len(samples) == 12
    for s in samples:
        assert 0 <= s.label < 10 and s.data[:3] == JPEG_SOI
        assert s.key.split("-")[1] == wnid[s.label], s.key  # keys look like val-n03888257-n03888257_7960
        assert decode_rgb(s.data).size == (224, 224)


def test_dataset_spec_opens_the_same_frames(cifar_test_samples):
    got = list(take(open_source("cifar10:test"), 20))
    assert [(s.key, s.data, s.label) for s in got] == [(s.key, s.data, s.label) for s in cifar_test_samples[:20]]
    assert [p.name for p in dataset_shards("cifar10", "train")] == [f"train-0000{i}.tar.gz" for i in range(5)]


def test_hand_made_shard_with_unlabelled_image(tmp_path, cifar_test_samples):
    import tarfile

    a, b = cifar_test_samples[:2]
    path = tmp_path / "mine.tar"
    with tarfile.open(path, "w") as t:
        for name, data in ((f"{a.key}.jpg", a.data), (f"{a.key}.cls", str(a.label).encode()), ("lonely.jpg", b.data)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    got = list(open_source(str(path)))
    assert [(s.key, s.label) for s in got] == [(a.key, a.label), ("lonely", None)]
    assert got[0].data == a.data and got[1].data == b.data


def test_bad_label_and_bad_shard_are_source_errors(tmp_path, cifar_test_samples):
    import tarfile

    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("k.jpg", cifar_test_samples[0].data), ("k.cls", b"cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError, match="not an integer"):
        list(open_source(str(path)))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file at all" * 10)
    with pytest.raises(SourceError, match="junk.tar.gz"):
        list(open_source(str(junk)))


# -- folders, single images, unknown sources --------------------------------------------------------


def _write_jpegs(cifar_test_samples, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "frames"
    written = {}
    for cls in ("dog", "cat", "ship"):
        (root / cls).mkdir(parents=True)
        for s in [s for s in cifar_test_samples if CLASSES["cifar10"][s.label] == cls][:2]:
            p = root / cls / f"{s.key}.jpg"
            p.write_bytes(s.data)
            written[f"{cls}/{s.key}"] = s.data
    (root / "loose.jpg").write_bytes(cifar_test_samples[0].data)  # not in a class folder
    (root / "notes.txt").write_text("not an image")
    return root, written


def test_image_folder_labels_by_folder(tmp_path, cifar_test_samples):
    root, written = _write_jpegs(cifar_test_samples, tmp_path)
    classes = CLASSES["cifar10"]
    got = {s.key: s for s in iter_image_folder(root, classes)}
    assert set(got) == set(written) | {"loose"}
    for key, data in written.items():
        assert got[key].data == data
        assert got[key].label == classes.index(key.split("/")[0])
    assert got["loose"].label is None
    # Without a class list the sorted folder names are the classes.
    sorted_names = ["cat", "dog", "ship"]
    for s in iter_image_folder(root):
        if s.key != "loose":
            assert s.label == sorted_names.index(s.key.split("/")[0])
    # open_source on a folder with no shards reads it as an image folder.
    via = {s.key: s.label for s in open_source(str(root), classes)}
    assert via == {k: s.label for k, s in got.items()}


def test_single_image_source(tmp_path, cifar_test_samples):
    s = cifar_test_samples[5]
    p = tmp_path / "one.JPG"
    p.write_bytes(s.data)
    got = list(open_source(str(p)))
    assert len(got) == 1 and got[0].data == s.data and got[0].label is None and got[0].key == "one"


@pytest.mark.parametrize("spec", ["does/not/exist", "cifar10:validation", "nosuchset:test", "*.nothing-matches"])
def test_unknown_sources_are_source_errors(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as ei:
        list(open_source(spec))
    assert str(ei.value)


def test_unrecognised_file_kind_is_a_source_error(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(SourceError, match="cannot tell"):
        open_source(str(p))


def test_data_root_honours_env(tmp_path, monkeypatch):
    real_test = shard("cifar10-jpeg/test-00000.tar.gz")
    monkeypatch.setenv("EDGESPLIT_DATA", str(tmp_path))
    assert data_root() == tmp_path
    with pytest.raises(SourceError) as ei:
        dataset_shards("cifar10", "test")
    assert str(tmp_path) in str(ei.value)
    (tmp_path / "cifar10-jpeg").mkdir()
    (tmp_path / "cifar10-jpeg" / "test-00000.tar.gz").symlink_to(real_test)
    assert dataset_shards("cifar10", "test") == [tmp_path / "cifar10-jpeg" / "test-00000.tar.gz"]
    assert next(iter(open_source("cifar10:test"))).label is not None
    monkeypatch.delenv("EDGESPLIT_DATA")
    assert data_root() != tmp_path and (data_root() / "cifar10-jpeg").is_dir()


# -- eval preprocessing ----------------------------------------------------------------------------


def test_preprocess_cifar(cifar_test_samples):
    s = cifar_test_samples[0]
    spec = {"shape": [3, 32, 32], "resize": 32, "mean": MEAN, "std": STD}
    x = preprocess(s.data, spec)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    pix = np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB"), np.float64) / 255.0
    want = ((pix - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(x, want, atol=1e-5)
    raw = preprocess(s.data, {"shape": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert raw.min() >= 0.0 and raw.max() <= 1.0 and raw.max() > 0.5


def test_preprocess_resizes_and_center_crops():
    s = next(iter_tar_shards([shard("imagenette-224/val-00000.tar.gz")]))
    spec = {"shape": [3, 112, 112], "resize": 128, "mean": MEAN, "std": STD}
    x = preprocess(s.data, spec)
    assert x.shape == (3, 112, 112) and x.dtype == np.float32
    img = Image.open(io.BytesIO(s.data)).convert("RGB").resize((128, 128), Image.BILINEAR).crop((8, 8, 120, 120))
    want = ((np.asarray(img, np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(x, want, atol=1e-5)


def test_reencode_jpeg_shrinks_and_stays_decodable(cifar_test_samples):
    s = cifar_test_samples[0]
    small = reencode_jpeg(s.data, 16, 20)
    assert small[:3] == JPEG_SOI and decode_rgb(small).size == (16, 16)
    assert len(reencode_jpeg(s.data, 32, 10)) < len(reencode_jpeg(s.data, 32, 90))


def test_undecodable_image_is_a_clear_error():
    with pytest.raises(ValueError, match="not a decodable image"):
        preprocess(b"\xff\xd8 definitely not a jpeg", {"shape": [3, 32, 32], "mean": MEAN, "std": STD})


# -- load_split and the device loader ----------------------------------------------------------------


def test_load_split_cache_round_trip(tmp_path):
    shard("cifar10-jpeg/test-00000.tar.gz")
    x0, y0 = load_split("cifar10", "test", 32, None, limit_per_shard=24)
    assert x0.shape == (24, 32, 32, 3) and x0.dtype == np.uint8 and y0.dtype == np.int64
    cache = tmp_path / "cache"
    x1, y1 = load_split("cifar10", "test", 32, cache, limit_per_shard=24)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith((".npy")) and ".tmp." not in f for f in files)
    x2, y2 = load_split("cifar10", "test", 32, cache, limit_per_shard=24)
    for a, b in ((x0, x1), (x0, x2), (y0, y1), (y0, y2)):
        np.testing.assert_array_equal(a, b)
    # The cache is keyed by the limit: another limit decodes afresh, it does not reuse these files.
    x3, _ = load_split("cifar10", "test", 32, cache, limit_per_shard=8)
    assert len(x3) == 8 and len(list(cache.iterdir())) == 4
    np.testing.assert_array_equal(x3, x0[:8])
    # Pixels are the decoded JPEGs themselves.
    first = next(iter_tar_shards([shard("cifar10-jpeg/test-00000.tar.gz")]))
    np.testing.assert_array_equal(x0[0], np.asarray(decode_rgb(first.data)))
    assert y0[0] == first.label


def test_load_split_parallel_equals_serial():
    shard("cifar10-jpeg/train-00000.tar.gz")
    x0, y0 = load_split("cifar10", "train", 32, None, limit_per_shard=6, workers=0)
    x1, y1 = load_split("cifar10", "train", 32, None, limit_per_shard=6, workers=2)
    assert x0.shape == (30, 32, 32, 3)  # 5 shards x 6
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(y0, y1)


@pytest.fixture(scope="module")
def small_split():
    shard("cifar10-jpeg/test-00000.tar.gz")
    return load_split("cifar10", "test", 32, None, limit_per_shard=40)


def test_device_loader_eval_batches(small_split):
    x, y = small_split
    dl = DeviceLoader(x, y, 16, torch.device("cpu"), MEAN, STD)
    assert len(dl) == 3
    batches = list(dl)
    assert [tuple(b[0].shape) for b in batches] == [(16, 3, 32, 32), (16, 3, 32, 32), (8, 3, 32, 32)]
    assert all(b[0].dtype == torch.float32 and b[1].dtype == torch.int64 for b in batches)
    xs = torch.cat([b[0] for b in batches]).numpy()
    want = ((x.astype(np.float64) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(xs, want, atol=1e-5)
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), y)
    # Eval loading is deterministic: a second pass is identical.
    again = list(dl)
    for (a, ya), (b, yb) in zip(batches, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    dl_drop = DeviceLoader(x, y, 16, torch.device("cpu"), MEAN, STD, drop_last=True)
    assert len(dl_drop) == 2 and len(list(dl_drop)) == 2


def test_device_loader_shuffle_is_a_seeded_permutation(small_split):
    x, y = small_split

    def order(seed):
        dl = DeviceLoader(x, np.arange(len(x)), 16, torch.device("cpu"), MEAN, STD, shuffle=True, seed=seed)
        return torch.cat([b[1] for b in dl]).tolist()

    a, b, c = order(1), order(1), order(2)
    assert sorted(a) == list(range(len(x)))
    assert a == b and a != c and a != sorted(a)


def _to_pixels(xb: torch.Tensor) -> np.ndarray:
    mean = np.asarray(MEAN).reshape(1, 3, 1, 1) * 255
    std = np.asarray(STD).reshape(1, 3, 1, 1) * 255
    return xb.double().numpy() * std + mean


def _shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """img [3,H,W] translated so that out[y, x] = img[y + dy, x + dx], zeros outside."""
    _, h, w = img.shape
    out = np.zeros_like(img)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    yi, xi = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    out[:, ys, xs] = img[:, yi, xi]
    return out


def test_crop_flip_is_a_translation_and_flip(small_split):
    x, y = small_split
    n = 16
    dl = DeviceLoader(x[:n], y[:n], n, torch.device("cpu"), MEAN, STD, augment="crop_flip", seed=3)
    xb, yb = next(iter(dl))
    assert tuple(xb.shape) == (n, 3, 32, 32)
    np.testing.assert_array_equal(yb.numpy(), y[:n])
    aug = _to_pixels(xb)
    orig = x[:n].transpose(0, 3, 1, 2).astype(np.float64)
    moved = flipped = 0
    for i in range(n):
        best = None
        for flip in (False, True):
            src = orig[i][:, :, ::-1] if flip else orig[i]
            for dx in range(-4, 5):
                for dy in range(-4, 5):
                    err = np.max(np.abs(_shifted(src, dx, dy) - aug[i]))
                    if best is None or err < best[0]:
                        best = (err, flip, dx, dy)
        assert best[0] < 1e-3, f"frame {i} is not a 4-px translation (+flip) of its source: {best}"
        moved += (best[2], best[3]) != (0, 0)
        flipped += best[1]
    assert moved >= n // 2 and 0 < flipped < n  # random per frame


def test_rrc_flip_keeps_shape_and_range(small_split):
    x, y = small_split
    dl = DeviceLoader(x, y, 20, torch.device("cpu"), MEAN, STD, augment="rrc_flip", shuffle=True, seed=0)
    plain = DeviceLoader(x, y, 20, torch.device("cpu"), MEAN, STD, shuffle=True, seed=0)
    for (a, ya), (b, yb) in zip(dl, plain):
        assert a.shape == b.shape == (20, 3, 32, 32) and torch.isfinite(a).all()
        assert torch.equal(ya, yb)  # the augmentation draws after the order: same labels, same order
        assert not torch.allclose(a, b)
        px = _to_pixels(a)
        assert px.min() > -1e-3 and px.max() < 255 + 1e-3  # bilinear mixes of pixels stay in range


def test_unknown_augmentation_is_refused(small_split):
    x, y = small_split
    with pytest.raises(ValueError, match="cutmix"):
        DeviceLoader(x, y, 8, torch.device("cpu"), MEAN, STD, augment="cutmix")


def test_video_file_source_yields_its_frames(tmp_path):
    """A real video (MJPEG in AVI, written by OpenCV from real CIFAR-10 frames) read through
    ``open_source``: every frame comes back, decodable, close to the frame that was written."""
    import cv2  # the dev extra of the README install provides OpenCV

    from edgesplit.data.sources import open_source, take
    from edgesplit.data.transforms import to_uint8_hwc

    frames = [to_uint8_hwc(s.data, 32, 32) for s in take(open_source("cifar10:test"), 12)]
    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    assert w.isOpened()
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    got = list(open_source(str(path)))
    assert [s.key for s in got] == [f"frame-{i:06d}" for i in range(len(frames))]
    for s, ref in zip(got, frames):
        back = to_uint8_hwc(s.data, 32, 32).astype(np.int16)
        assert s.label is None
        assert np.abs(back - ref).mean() < 12  # two lossy JPEG passes, same picture
