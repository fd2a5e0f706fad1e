"""docs/BUNDLE.md section 9 (the worked example) against the bundle it describes: every value the
text quotes from models/cifar10-resnet20-bottlefit (hashes, sizes, the manifest excerpt, the mode's
float32 scale, the quantized and packed bytes, the head's tensor names and shapes) is read from the
doc and compared with the real bundle, the reference reader and the reference codec, so a re-export
or a codec change that the doc does not follow fails here."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgesplit.bundle import MANIFEST, Bundle, sha256_file
from edgesplit.wire.codec import pack_bits, packed_nbytes, quantize

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BUNDLE.md"


@pytest.fixture(scope="module")
def example() -> str:
    """Section 9's text, up to the next section."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"^## 9\. Worked example: `models/([\w-]+)`\n(.*?)^## 10\.", text, re.S | re.M)
    assert found, "docs/BUNDLE.md has no section 9 worked example"
    return found.group(0)


@pytest.fixture(scope="module")
def bundle(example) -> Bundle:
    name = re.search(r"`models/([\w-]+)`", example).group(1)
    return Bundle.load(ROOT / "models" / name)


def _one(pattern: str, text: str) -> re.Match:
    found = re.search(pattern, text, re.S)
    assert found, f"docs/BUNDLE.md section 9 no longer says {pattern!r}"
    return found


def _contained(quoted: Any, real: Any, where: str = "manifest") -> None:
    """Every key and value the abbreviated excerpt quotes is in the real manifest, equal."""
    if isinstance(quoted, dict):
        assert isinstance(real, dict), where
        for k, v in quoted.items():
            assert k in real, f"{where}.{k} is quoted but the bundle has no such key"
            _contained(v, real[k], f"{where}.{k}")
    elif isinstance(quoted, list):
        assert isinstance(real, list) and len(quoted) == len(real), where
        for i, (q, r) in enumerate(zip(quoted, real)):
            _contained(q, r, f"{where}[{i}]")
    else:
        assert quoted == real and type(quoted) is type(real), f"{where}: the doc says {quoted!r}, the bundle {real!r}"


def test_manifest_size_and_bundle_hash(example, bundle):
    raw = (bundle.root / MANIFEST).read_bytes()
    m = _one(r"`manifest\.json` \((\d+) bytes; bundle hash\s+`([0-9a-f]{64})`\)", example)
    assert int(m.group(1)) == len(raw)
    assert m.group(2) == hashlib.sha256(raw).hexdigest() == bundle.hash
    assert int(_one(r"hash the (\d+) stored bytes", example).group(1)) == len(raw)


def test_the_manifest_excerpt_quotes_the_real_manifest(example, bundle):
    block = _one(r"```json\n(.*?)```", example).group(1)
    # The excerpt's "...": "{...}" is an object left out, ", ..." are keys left out.
    parsable = re.sub(r"\{\s*\.\.\.\s*\}", "{}", re.sub(r",\s*\.\.\.", "", block))
    quoted = json.loads(parsable)
    _contained(quoted, bundle.manifest)
    # the file entries are quoted in full: hash and size of the file on disk
    for role, entry in quoted["files"].items():
        f = bundle.root / entry["path"]
        assert entry["sha256"] == sha256_file(f) and entry["bytes"] == f.stat().st_size, role
    assert set(quoted["files"]) == set(bundle.manifest["files"])


def test_abbreviated_hashes_are_real_ones(example, bundle):
    known = [bundle.hash] + [e["sha256"] for e in bundle.manifest["files"].values()]
    shortened = re.findall(r"`([0-9a-f]{6,})…([0-9a-f]{4,})`", example)
    assert len(shortened) >= 2
    assert bundle.hash.startswith(shortened[0][0]) and bundle.hash.endswith(shortened[0][1])
    for head, tail in shortened:
        assert any(h.startswith(head) and h.endswith(tail) for h in known), f"{head}…{tail} is no hash of the bundle"
    assert re.search(r"hash `head\.onnx` → must equal\s+`" + shortened[1][0], example)
    assert bundle.manifest["files"]["head"]["sha256"].startswith(shortened[1][0])


def test_the_head_input_and_output(example, bundle):
    m = _one(r"input `(\w+)` `\[batch,(\d+),(\d+),(\d+)\]` → output `(\w+)` `\[batch,(\d+),(\d+),(\d+)\]`", example)
    session = ort.InferenceSession(str(bundle.file("head")), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (m.group(1), m.group(5)) and out.name == bundle.wire_spec["name"]
    assert inp.shape[1:] == [int(x) for x in m.group(2, 3, 4)] == bundle.input_spec["shape"]
    assert out.shape[1:] == [int(x) for x in m.group(6, 7, 8)] == bundle.wire_spec["shape"]


def test_the_default_mode_and_its_float32_scale(example, bundle):
    m = _one(r"`default_mode` (\d+), `([\w-]+)`: all (\d+) channels, (\d+) bits", example)
    mode = bundle.default_mode
    assert (mode.id, mode.name, mode.channels, mode.bits) == (
        int(m.group(1)),
        m.group(2),
        int(m.group(3)),
        int(m.group(4)),
    )
    s = _one(r"`scale`\s+([\d.]+), which as float32 is ([\d.]+) \(`0x([0-9A-Fa-f]{8})`\), `zero_point` (\d+)", example)
    assert float(s.group(1)) == mode.scale
    scale32 = np.float32(mode.scale)
    assert float(s.group(2)) == float(scale32)
    assert int(s.group(3), 16) == struct.unpack("<I", scale32.tobytes())[0]
    assert int(s.group(4)) == mode.zero_point
    codes = _one(r"(\d+) codes at (\d+) bits = (\d+) bytes \(`bytes_per_frame`\)", example)
    numel = int(np.prod(bundle.wire_spec["shape"]))
    assert (int(codes.group(1)), int(codes.group(2))) == (numel, mode.bits)
    assert int(codes.group(3)) == packed_nbytes(numel, mode.bits) == mode.bytes_per_frame


def test_the_quantized_values_and_packed_bytes(example, bundle):
    mode = bundle.default_mode
    quoted = re.findall(r"`(−?[\d.]+) → ([^`]*)`", example)
    assert len(quoted) >= 4
    for value, steps in quoted:
        x = np.float32(float(value.replace("−", "-")))
        code = int(quantize(np.array([x]), mode.bits, mode.scale, mode.zero_point)[0])
        assert int(re.findall(r"\d+", steps)[-1]) == code, f"{value} → {steps}: the codec gives {code}"
        shown = re.search(r"rint\((−?[\d.]+)\)", steps)
        if shown:  # the scaled value, as the doc rounds it
            scaled = float(np.divide(x, np.float32(mode.scale), dtype=np.float32))
            digits = len(shown.group(1).split(".")[1])
            assert float(shown.group(1).replace("−", "-")) == round(scaled, digits)
    packed = _one(r"codes `\[([\d, ]+)\]` → bytes `([0-9a-f ]+)`", example)
    codes = np.array([int(c) for c in packed.group(1).split(",")], dtype=np.uint8)
    assert codes.tolist() == [int(re.findall(r"\d+", s)[-1]) for _, s in quoted][: len(codes)]
    assert pack_bits(codes, mode.bits).hex(" ") == packed.group(2)


def test_the_result_width(example, bundle):
    m = _one(r"the result carries (\d+) float32 logits", example)
    assert int(m.group(1)) == len(bundle.classes)
