"""Bundle reading for the clean-room client, written from docs/BUNDLE.md only.

Manifest identity and checks (§2, §3, §10), the `cdf` tables (§7.2), preprocessing (§5), the
head (§4, §6) and labelled CIFAR-10 frames from the shared WebDataset shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from cr_codec import AnsTable, validate_cdf_file
from PIL import Image

HEX64 = re.compile(r"^[0-9a-f]{64}$")
KNOWN_FAMILIES = {"bottlefit", "slimmable", "edvit", "sfprompt"}  # BUNDLE.md §3 "Today: ..."
FIXED_ROLES = {"head", "tail", "full", "tail_torch", "cdf", "body", "fusion"}
TAG_ROLE = re.compile(r"^head\.[a-z0-9_-]{1,32}$")
SUBMODEL_ROLE = re.compile(r"^submodel\.[0-9]+$")


class BundleError(ValueError):
    pass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Bundle:
    """A verified head-tail bundle: its hash, manifest, modes by id, and heads on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        raw = (self.directory / "manifest.json").read_bytes()
        self.hash = hashlib.sha256(raw).hexdigest()  # §2: the stored bytes, never re-serialized
        self.manifest = json.loads(raw.decode("utf-8"))
        self._check_manifest()
        self._verify_files()
        self.modes = {m["id"]: m for m in self.manifest["modes"]}
        self.default_mode = self.manifest.get("default_mode", self.manifest["modes"][0]["id"])
        self.wire_name = self.manifest["wire"]["name"]
        self.wire_shape = tuple(self.manifest["wire"]["shape"])
        self.classes = self.manifest["classes"]
        self.tables = self._load_tables()
        self._heads: dict[str, ort.InferenceSession] = {}

    def _check_manifest(self) -> None:
        m = self.manifest
        if m.get("schema_version") != 1 or not _is_int(m.get("schema_version")):
            raise BundleError(f"schema_version {m.get('schema_version')!r}")
        if m.get("family") not in KNOWN_FAMILIES:
            raise BundleError(f"family {m.get('family')!r}")
        for key in ("name", "classes", "input", "wire", "modes", "files"):
            if key not in m:
                raise BundleError(f"missing {key}")
        if m["family"] in ("edvit", "sfprompt"):
            raise BundleError(f"this client serves head-tail bundles only, not {m['family']}")
        inp = m["input"]
        shape = inp["shape"]
        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2] or not all(_is_int(v) for v in shape):
            raise BundleError(f"input.shape {shape}")
        for key, fixed in (("layout", "NCHW"), ("dtype", "float32"), ("color", "RGB")):
            if key in inp and inp[key] != fixed:
                raise BundleError(f"input.{key} {inp[key]!r}")
        if not all(v > 0 for v in inp["std"]) or not _is_int(inp["resize"]) or inp["resize"] < 1:
            raise BundleError("input.std/resize")
        wire_channels = m["wire"]["shape"][0]
        for role in m["files"]:
            if role not in FIXED_ROLES and not TAG_ROLE.match(role) and not SUBMODEL_ROLE.match(role):
                raise BundleError(f"unknown file role {role!r}")
        if "head" not in m["files"] or "tail" not in m["files"]:
            raise BundleError("files: head and tail are required")
        seen = set()
        for index, mode in enumerate(m["modes"]):
            where = f"modes[{index}] (id {mode.get('id')})"
            if not _is_int(mode.get("id")) or not 0 <= mode["id"] < 2**31 or mode["id"] in seen:
                raise BundleError(f"{where}.id")
            seen.add(mode["id"])
            if mode.get("head", "head") not in m["files"]:
                raise BundleError(f"{where}.head")
            if not _is_int(mode.get("channels")) or not 1 <= mode["channels"] <= wire_channels:
                raise BundleError(f"{where}.channels")
            quant = mode["quant"]
            scale = quant["scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
                raise BundleError(f"{where}.quant.scale")
            codec = mode.get("codec")
            if codec is None:
                if mode.get("bits") not in (2, 4, 6, 8) or not _is_int(mode["bits"]):
                    raise BundleError(f"{where}.bits")
                if not _is_int(quant["zero_point"]) or not 0 <= quant["zero_point"] < 1 << mode["bits"]:
                    raise BundleError(f"{where}.quant.zero_point")
            elif codec == "ans":
                entropy = mode.get("entropy") or {}
                if mode["bits"] != 32 or quant["zero_point"] != 0 or not HEX64.match(entropy.get("sha256", "")):
                    raise BundleError(f"{where}: ans mode keys")
                if "cdf" not in m["files"] or not entropy.get("tables"):
                    raise BundleError(f"{where}: ans mode without a cdf file or table set")
            else:
                raise BundleError(f"{where}.codec {codec!r}")
        default = m.get("default_mode")
        if default is not None and (not _is_int(default) or default not in seen):
            raise BundleError(f"default_mode {default!r}")

    def _verify_files(self) -> None:
        """§2: every entry's form first, then every file's size and SHA-256."""
        entries = self.manifest["files"]
        for role, entry in entries.items():
            path = entry["path"]
            if "/" in path or path.startswith(".") or not HEX64.match(entry.get("sha256", "")):
                raise BundleError(f"files.{role}: bad path or sha256")
        for role, entry in entries.items():
            data = (self.directory / entry["path"]).read_bytes()
            if "bytes" in entry and len(data) != entry["bytes"]:
                raise BundleError(f"files.{role}: size differs (altered or belongs to another bundle)")
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise BundleError(f"files.{role}: hash differs (altered or belongs to another bundle)")

    def _load_tables(self) -> dict[int, tuple[list[AnsTable], bytes]]:
        """§7.2: per ans mode, its channel tables and the frame tag (first 2 digest bytes)."""
        ans_modes = [m for m in self.modes.values() if m.get("codec") == "ans"]
        if not ans_modes:
            return {}
        doc = json.loads((self.directory / self.manifest["files"]["cdf"]["path"]).read_bytes())
        validate_cdf_file(doc)
        out = {}
        for mode in ans_modes:
            table_set = doc["sets"].get(mode["entropy"]["tables"])
            if table_set is None or table_set["sha256"] != mode["entropy"]["sha256"]:
                raise BundleError(f"mode {mode['id']}: table set missing or digest differs")
            if len(table_set["channels"]) != mode["channels"]:
                raise BundleError(f"mode {mode['id']}: table count differs from channels")
            tables = [AnsTable(ch["offset"], ch["freqs"]) for ch in table_set["channels"]]
            out[mode["id"]] = (tables, bytes.fromhex(table_set["sha256"])[:2])
        return out

    def preprocess(self, jpeg: bytes) -> np.ndarray:
        """§5 steps 1-5 for one image: [3, S, S] float32."""
        inp = self.manifest["input"]
        side, resize = inp["shape"][-1], inp["resize"]
        image = Image.open(io.BytesIO(jpeg))
        image = image.convert("RGB")
        width, height = image.size
        if min(width, height) != resize:
            k = resize / min(width, height)
            size = (max(side, round(width * k)), max(side, round(height * k)))
            image = image.resize(size, Image.BILINEAR)
            width, height = image.size
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        pixels = np.asarray(image, dtype=np.uint8).astype(np.float32)
        mean = np.array(inp["mean"], dtype=np.float32)
        std = np.array(inp["std"], dtype=np.float32)
        x = (pixels * np.float32(1 / 255) - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def head_output(self, images: np.ndarray, role: str = "head") -> np.ndarray:
        """§6 step 1, one frame at a time ([1,3,S,S] each), stacked: [N, C', h, w] float32."""
        if role not in self._heads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            path = str(self.directory / self.manifest["files"][role]["path"])
            self._heads[role] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session = self._heads[role]
        name = session.get_inputs()[0].name  # §4: take the single input and output by position
        return np.stack([session.run(None, {name: image[None]})[0][0] for image in images])


def load_frames(shard: str | Path, count: int) -> tuple[list[bytes], np.ndarray]:
    """The first `count` samples of a WebDataset shard (KEY.jpg + KEY.cls), in member order."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(shard, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if key not in samples:
                if len(order) == count and all(len(samples[k]) == 2 for k in order):
                    break
                samples[key] = {}
                order.append(key)
            samples[key][ext] = tar.extractfile(member).read()
    keys = order[:count]
    jpegs = [samples[k]["jpg"] for k in keys]
    labels = np.array([int(samples[k]["cls"].decode("ascii").strip()) for k in keys], dtype=np.int64)
    return jpegs, labels
