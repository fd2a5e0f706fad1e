"""Contract 1, the bundle, on a real one: the CPU recipe trained for a few steps on real CIFAR-10
JPEGs and exported by ``export_bundle`` (see build_fixtures.py). Verification, refusals with
clear messages, tar shipping, ``edgesplit inspect``, and the ONNX graphs against torch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from build_fixtures import CHECK_FRAMES, one_torch_thread, short_build  # noqa: F401  (fixtures)

from edgesplit.bundle import MANIFEST, Bundle, BundleError, sha256_file, validate_manifest, write_manifest
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.families.registry import family_names, get_family

ROOT = Path(__file__).resolve().parents[1]


def copy_bundle(short_build, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(short_build.bundle_dir, dst)
    return dst


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgesplit", "inspect", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


# -- loading and verification ------------------------------------------------------------------------


def test_bundle_loads_and_verifies(short_build):
    b = Bundle.load(short_build.bundle_dir)
    raw = (short_build.bundle_dir / MANIFEST).read_bytes()
    assert b.hash == hashlib.sha256(raw).hexdigest() == short_build.bundle.hash
    assert b.family == "bottlefit" and b.name == "cifar10-resnet20-bottlefit"
    assert len(b.classes) == 10 and b.classes[3] == "cat"
    assert b.input_spec["shape"] == [3, 32, 32]
    assert b.wire_spec["shape"] == [12, 8, 8]
    assert [m.bits for m in b.modes] == [8, 4, 2] and [m.id for m in b.modes] == [0, 1, 2]
    assert b.default_mode.bits == 4
    for role in ("head", "tail", "full"):
        f = b.file(role)
        entry = b.manifest["files"][role]
        assert f.is_file() and sha256_file(f) == entry["sha256"] and f.stat().st_size == entry["bytes"]
    with pytest.raises(BundleError, match="no mode 7"):
        b.mode(7)
    with pytest.raises(BundleError, match="tail_torch"):
        b.file("tail_torch")


def test_flipped_byte_is_refused_naming_the_file(short_build, tmp_path):
    root = copy_bundle(short_build, tmp_path)
    tail = root / "tail.onnx"
    data = bytearray(tail.read_bytes())
    data[len(data) // 2] ^= 0x01
    tail.write_bytes(bytes(data))
    with pytest.raises(BundleError) as ei:
        Bundle.load(root)
    msg = str(ei.value)
    assert "tail.onnx" in msg and "hash" in msg
    assert "head.onnx" not in msg
    # Skipping verification is the only way past it, and an explicit verify() still refuses.
    b = Bundle.load(root, verify=False)
    with pytest.raises(BundleError, match="tail.onnx"):
        b.verify()


def test_missing_file_is_refused(short_build, tmp_path):
    root = copy_bundle(short_build, tmp_path)
    (root / "head.onnx").unlink()
    with pytest.raises(BundleError) as ei:
        Bundle.load(root)
    assert "head.onnx" in str(ei.value) and "missing" in str(ei.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)
    (tmp_path / MANIFEST).write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def _mutations():
    def setk(path, value):
        def f(m):
            d = m
            *parents, last = path
            for k in parents:
                d = d[k]
            d[last] = value

        return f

    def delk(path):
        def f(m):
            d = m
            *parents, last = path
            for k in parents:
                d = d[k]
            del d[last]

        return f

    def dup_ids(m):
        m["modes"][1]["id"] = m["modes"][0]["id"]

    return [
        ("schema-2", setk(["schema_version"], 2), "schema_version"),
        ("schema-str", setk(["schema_version"], "1"), "schema_version"),
        ("schema-missing", delk(["schema_version"]), "schema_version"),
        ("family", setk(["family"], "transformer-magic"), "family"),
        ("modes-missing", delk(["modes"]), "modes"),
        ("modes-empty", setk(["modes"], []), "modes"),
        ("modes-dup", dup_ids, "mode ids"),
        ("mode-no-quant", lambda m: m["modes"][0].pop("quant"), "mode"),
        ("classes-empty", setk(["classes"], []), "classes"),
        ("input-mean", delk(["input", "mean"]), "input.mean"),
        ("wire-shape", delk(["wire", "shape"]), "wire.shape"),
        ("files-no-tail", delk(["files", "tail"]), "tail"),
        ("files-role", setk(["files", "weights"], {"path": "x.bin", "sha256": "0" * 64}), "weights"),
        ("files-path", setk(["files", "head", "path"], "../head.onnx"), "files.head.path"),
        ("files-sha", delk(["files", "head", "sha256"]), "files.head.sha256"),
    ]


@pytest.mark.parametrize("mutate, field", [(m, f) for _, m, f in _mutations()], ids=[i for i, _, _ in _mutations()])
def test_bad_manifest_is_refused_naming_the_field(short_build, tmp_path, mutate, field):
    root = copy_bundle(short_build, tmp_path)
    m = json.loads((root / MANIFEST).read_text())
    mutate(m)
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError) as ei:
        Bundle.load(root)
    assert field in str(ei.value)


SHIPPED = ROOT / "models" / "cifar10-resnet20-bottlefit"


def _edit(*path_and_value):
    """A manifest edit: set the key at ``path`` (keys and list indices) to ``value``."""
    *path, last, value = path_and_value

    def f(m):
        for k in path:
            m = m[k]
        m[last] = value

    return f


def _resize_file(role: str, size: int):
    def f(m):
        m["files"][role]["bytes"] = size

    return f


# One case per way the manifest contract (docs/BUNDLE.md section 3) can be broken in a single field;
# the error must name the key and the mode id or file role it belongs to.
CONTRACT_BREAKS = [
    ("bits-3", _edit("modes", 1, "bits", 3), ["'modes[1] (id 1).bits'", "[2, 4, 6, 8]"]),
    ("bits-float", _edit("modes", 0, "bits", 8.7), ["'modes[0] (id 0).bits'", "int"]),
    ("id-string", _edit("modes", 0, "id", "0"), ["'modes[0].id'", "int"]),
    ("mean-scalar", _edit("input", "mean", 0), ["'input.mean'", "list"]),
    ("channels-over-wire", _edit("modes", 2, "channels", 13), ["'modes[2] (id 2).channels'", "[1, 12]"]),
    ("channels-zero", _edit("modes", 2, "channels", 0), ["'modes[2] (id 2).channels'"]),
    ("scale-zero", _edit("modes", 1, "quant", "scale", 0.0), ["'modes[1] (id 1).quant.scale'", "> 0"]),
    ("scale-infinite", _edit("modes", 1, "quant", "scale", float("inf")), ["'modes[1] (id 1).quant.scale'"]),
    ("zero-point-over", _edit("modes", 1, "quant", "zero_point", 16), ["'modes[1] (id 1).quant.zero_point'", "15"]),
    ("zero-point-negative", _edit("modes", 0, "quant", "zero_point", -1), ["'modes[0] (id 0).quant.zero_point'"]),
    ("default-mode-unknown", _edit("default_mode", 7), ["'default_mode'", "7"]),
    ("file-entry-not-object", _edit("files", "full", "full.onnx"), ["'files.full'", "object"]),
    ("file-size-mismatch", _resize_file("tail", 619627), ["files.tail.bytes", "619628"]),
    (
        "sha256-uppercase",
        lambda m: m["files"]["head"].update(sha256=m["files"]["head"]["sha256"].upper()),
        ["'files.head.sha256'", "lowercase"],
    ),
]


@pytest.mark.parametrize("mutate, named", [c[1:] for c in CONTRACT_BREAKS], ids=[c[0] for c in CONTRACT_BREAKS])
def test_shipped_bundle_with_one_contract_break_is_refused_naming_the_key(tmp_path, mutate, named):
    root = tmp_path / "bundle"
    shutil.copytree(SHIPPED, root)
    assert Bundle.load(root).hash == Bundle.load(SHIPPED).hash  # the copy itself is sound
    m = json.loads((root / MANIFEST).read_text())
    mutate(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError) as ei:
        Bundle.load(root)
    for text in named:
        assert text in str(ei.value), str(ei.value)
    # write_manifest (the exporters' path) refuses the same manifest, except the two file
    # checks it repairs by re-hashing the files, and leaves no manifest behind when it does.
    if named[0] not in ("files.tail.bytes", "'files.head.sha256'"):
        (root / MANIFEST).unlink()
        with pytest.raises(BundleError):
            write_manifest(root, m)
        assert not (root / MANIFEST).exists()


SHIPPED_SCATTER = ROOT / "models" / "cifar10-edvit-n2"


def test_a_registered_familys_own_section_is_checked_through_the_registry(tmp_path):
    """The bundle schema names no family: a family's own section (ED-ViT's ``edvit``, BUNDLE.md
    section 7.1) is refused by the ``manifest_check`` the family registers, run through the registry,
    with the key named; a family nothing registers is refused with the known ones listed."""
    root = tmp_path / "bundle"
    shutil.copytree(SHIPPED_SCATTER, root)
    m = json.loads((root / MANIFEST).read_text())
    family = get_family(m["family"])
    assert family.serving == "scatter" and family.manifest_check  # the shape whose modes the family defines
    Bundle.load(root)  # the shipped one is sound
    m["edvit"]["fusion"]["role"] = "fuse"
    why = "'edvit.fusion.role' must be 'fusion', got 'fuse'"
    with pytest.raises(ValueError, match=f"^{why}$"):
        family.check_manifest(m, m["files"])  # the registry's path, as the schema takes it
    (root / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError) as ei:
        Bundle.load(root)
    assert str(ei.value) == f"manifest: {why}"
    del m["edvit"]
    with pytest.raises(BundleError, match="^manifest: missing 'edvit'$"):
        validate_manifest(m)
    m["family"] = "edvit-next"  # one that nothing registers
    with pytest.raises(BundleError) as ei:
        validate_manifest(m)
    assert str(ei.value) == f"manifest: unknown family 'edvit-next' (known: {', '.join(family_names())})"
    assert "edvit" in family_names()


def test_the_scatter_runtime_goes_by_serving_shape():
    from edgesplit.edge.scatter_bundle import EdvitBundle

    scatter = EdvitBundle.load(SHIPPED_SCATTER)
    assert scatter.bundle.serving == "scatter" and len(scatter.submodels) == 2
    with pytest.raises(BundleError, match="family 'bottlefit' is served 'head-tail', not 'scatter'"):
        EdvitBundle.load(SHIPPED)


def test_manifest_edit_changes_the_bundle_identity(short_build, tmp_path):
    root = copy_bundle(short_build, tmp_path)
    m = json.loads((root / MANIFEST).read_text())
    m["modes"][0]["accuracy"] = 0.99
    (root / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    b = Bundle.load(root)  # still a valid bundle: every file matches
    assert b.hash != short_build.bundle.hash and b.modes[0].accuracy == 0.99


# -- shipping as a tar -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, suffix", [("w:gz", ".tar.gz"), ("w", ".tar")])
def test_tar_of_the_bundle_loads(short_build, tmp_path, mode, suffix):
    tar = tmp_path / f"bundle{suffix}"
    with tarfile.open(tar, mode) as t:
        t.add(short_build.bundle_dir, arcname="cifar10-bundle")
    b = Bundle.load(tar)
    assert b.hash == short_build.bundle.hash
    assert b.root != short_build.bundle_dir and (b.root / "tail.onnx").is_file()
    assert [m.bits for m in b.modes] == [8, 4, 2]


def test_tampered_tar_is_refused_and_cannot_escape(short_build, tmp_path):
    root = copy_bundle(short_build, tmp_path)
    data = bytearray((root / "head.onnx").read_bytes())
    data[-100] ^= 0xFF
    (root / "head.onnx").write_bytes(bytes(data))
    escape = f"edgesplit-escape-{uuid.uuid4().hex}"
    tar = tmp_path / "bad.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(root, arcname="b")
        info = tarfile.TarInfo(f"../../{escape}")
        payload = b"outside"
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    with pytest.raises(BundleError, match="head.onnx"):
        Bundle.load(tar)
    tmp_root = Path(tempfile.gettempdir())
    assert not (tmp_root / escape).exists() and not (tmp_root.parent / escape).exists()


# -- edgesplit inspect -----------------------------------------------------------------------------


def test_inspect_prints_the_summary(short_build):
    r = inspect(str(short_build.bundle_dir))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    b = short_build.bundle
    for text in (
        b.name,
        "bottlefit",
        b.hash,
        "classes  10",
        "[12, 8, 8]",
        "[3, 32, 32]",
        "head.onnx",
        "tail.onnx",
        "full.onnx",
        "export checks",
        "top1_agreement",
    ):
        assert text in out, text
    rows = [
        [t for t in line.split() if t != "*"]
        for line in out.splitlines()
        if line.strip().startswith(("0 ", "1 ", "2 "))
    ]
    # id, name, channels, bits, bytes/frame per mode, in manifest order.
    assert [r[:5] for r in rows] == [
        ["0", "c12-b8", "12", "8", "768"],
        ["1", "c12-b4", "12", "4", "384"],
        ["2", "c12-b2", "12", "2", "192"],
    ]
    assert [float(r[5]) for r in rows] == pytest.approx([m.accuracy for m in b.modes], abs=1e-4)
    assert "c12-b4 *" in out  # the default mode is marked
    sizes = {
        line.split()[0]: int(line.split()[2])
        for line in out.splitlines()
        if len(line.split()) > 2 and line.split()[1].endswith(".onnx")
    }
    assert sizes == {role: b.file(role).stat().st_size for role in ("head", "tail", "full")}


def test_inspect_json(short_build):
    r = inspect(str(short_build.bundle_dir), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    m = short_build.bundle.manifest
    assert s["verified"] is True and s["hash"] == short_build.bundle.hash
    assert s["name"] == m["name"] and s["family"] == "bottlefit" and s["classes"] == 10
    assert s["input"] == m["input"] and s["wire"]["shape"] == [12, 8, 8]
    assert [(x["id"], x["bits"], x["bytes_per_frame"], x["channels"]) for x in s["modes"]] == [
        (0, 8, 768, 12),
        (1, 4, 384, 12),
        (2, 2, 192, 12),
    ]
    assert [x["accuracy"] for x in s["modes"]] == [x["accuracy"] for x in m["modes"]]
    assert all(x["head_ms"] and all(v > 0 for v in x["head_ms"].values()) for x in s["modes"])
    assert [x["default"] for x in s["modes"]] == [False, True, False]
    assert {f["role"]: f["bytes"] for f in s["files"]} == {k: v["bytes"] for k, v in m["files"].items()}
    assert s["export_checks"] == m["export"]["checks"]


def test_inspect_refuses_a_tampered_bundle(short_build, tmp_path):
    root = copy_bundle(short_build, tmp_path)
    data = bytearray((root / "tail.onnx").read_bytes())
    data[1000] ^= 0x10
    (root / "tail.onnx").write_bytes(bytes(data))
    for args in ((str(root),), (str(root), "--json")):
        r = inspect(*args)
        assert r.returncode == 1
        assert "tail.onnx" in r.stderr and "Traceback" not in r.stderr + r.stdout
        assert r.stdout == ""
    r = inspect(str(tmp_path / "nothing-here"))
    assert r.returncode == 1 and "not a bundle" in r.stderr and "Traceback" not in r.stderr


def test_inspect_does_not_import_torch(short_build):
    code = (
        "import sys; from edgesplit.bundle_cli import inspect_main; "
        f"rc = inspect_main([{str(short_build.bundle_dir)!r}]); "
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "NOTORCH 0", r.stdout + r.stderr


# -- ONNX graphs against torch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_images(short_build):
    spec = short_build.bundle.input_spec
    samples = list(take(open_source("cifar10:test"), CHECK_FRAMES))
    return np.stack([preprocess(s.data, spec) for s in samples]), np.asarray([s.label for s in samples])


def test_onnx_head_and_tail_match_torch_and_the_recorded_checks(short_build, check_images):
    from edgesplit.builder.pipeline import load_student

    b = short_build.bundle
    checks = b.manifest["export"]["checks"]
    assert {k: checks[k]["frames"] for k in ("head", "tail", "full")} == {
        "head": CHECK_FRAMES,
        "tail": CHECK_FRAMES,
        "full": CHECK_FRAMES,
    }
    # What export recorded: fp16-stored weights stay within a fraction of a percent of torch.
    for g in ("head", "tail", "full"):
        assert checks[g]["max_rel_diff"] < 1e-2, (g, checks[g])
    assert checks["tail"]["top1_agreement"] >= 0.97 and checks["full"]["top1_agreement"] >= 0.97

    x, _ = check_images
    model, _ = load_student(short_build.student_path)
    head = create_engine(b.file("head"), "ort", threads=1)
    tail = create_engine(b.file("tail"), "ort", threads=1)
    z = head.run1(x)
    logits = tail.run1(z)
    assert z.shape == (len(x), 12, 8, 8) and logits.shape == (len(x), 10)
    with torch.no_grad():
        z_ref = model.encode(torch.from_numpy(x)).numpy()
        l_ref = model.decode(torch.from_numpy(z)).numpy()
        chain_ref = model(torch.from_numpy(x)).numpy()  # quantizer has no fixed params: float path
    head_abs = float(np.max(np.abs(z - z_ref)))
    tail_abs = float(np.max(np.abs(logits - l_ref)))
    # Recomputed on the same frames, the figures agree with the recorded ones.
    assert head_abs == pytest.approx(checks["head"]["max_abs_diff"], rel=0.25, abs=1e-6)
    assert tail_abs == pytest.approx(checks["tail"]["max_abs_diff"], rel=0.25, abs=1e-6)
    assert head_abs / np.max(np.abs(z_ref)) < 1e-2 and tail_abs / np.max(np.abs(l_ref)) < 1e-2
    assert np.mean(logits.argmax(1) == l_ref.argmax(1)) == pytest.approx(checks["tail"]["top1_agreement"])
    # Head and tail chained in ONNX Runtime behave like the torch split end to end.
    assert np.mean(logits.argmax(1) == chain_ref.argmax(1)) >= 0.97


def test_onnx_full_matches_the_teacher(short_build, check_images):
    from edgesplit.builder.zoo import create_model

    x, _ = check_images
    teacher = create_model("resnet20_cifar", 10)
    teacher.load_state_dict(torch.load(short_build.run_dir / "teacher.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        ref = teacher.eval()(torch.from_numpy(x)).numpy()
    out = create_engine(short_build.bundle.file("full"), "ort", threads=1).run1(x)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-2
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.97


def test_onnx_graphs_take_any_batch(short_build, check_images):
    x, _ = check_images
    b = short_build.bundle
    head = create_engine(b.file("head"), "ort", threads=1)
    tail = create_engine(b.file("tail"), "ort", threads=1)
    z_all = head.run1(x[:5])
    for n in (1, 3):
        np.testing.assert_allclose(head.run1(x[:n]), z_all[:n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tail.run1(z_all[:1]), tail.run1(z_all)[:1], rtol=1e-4, atol=1e-4)
    assert os.path.getsize(b.file("head")) < os.path.getsize(b.file("tail"))  # the device half is the small one
