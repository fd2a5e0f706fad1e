"""The build pipeline on real data: results of a short real run (build_fixtures.short_build), resume
from finished and half-finished run directories, wire calibration, fake quantization against the
wire codec, the student checkpoint, and ``edgesplit eval`` recomputed independently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from build_fixtures import LIMIT_PER_SHARD, one_torch_thread, short_build, short_recipe  # noqa: F401  (fixtures)

from edgesplit.builder.bottleneck import FakeQuant
from edgesplit.builder.data import DeviceLoader, load_split
from edgesplit.builder.pipeline import MEAN, STD, load_student, run_recipe
from edgesplit.builder.train import calibrate, evaluate
from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.engine import create_engine
from edgesplit.families.bottlefit.model import BottleFitSplit, student_config
from edgesplit.families.bottlefit.train import collect_wire
from edgesplit.wire import codec

ROOT = Path(__file__).resolve().parents[1]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "wall_sec"}


# -- the short run's results ----------------------------------------------------------------------


def test_short_run_results(short_build):
    res = short_build.results
    assert res == short_build.results_file()
    assert res["recipe"] == "cifar10-resnet20-bottlefit" and res["device"] == "cpu"
    for k in ("teacher_accuracy", "stage1_accuracy", "float_accuracy"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["eval_frames"] == LIMIT_PER_SHARD  # one test shard, limited
    assert [m["bits"] for m in res["modes"]] == [8, 4, 2]
    for m in res["modes"]:
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["scale"] > 0 and 0 <= m["zero_point"] < 2 ** m["bits"] and m["mse"] >= 0
    # Fewer levels, coarser steps, larger error.
    mses = [m["mse"] for m in res["modes"]]
    assert mses[0] < mses[1] < mses[2]
    # Every stage trained exactly one epoch on 200 real images (5 shards x 40), then the run finished.
    log = _log(short_build.run_dir)
    data = next(r for r in log if r.get("event") == "data")
    assert (data["train"], data["eval"]) == (5 * LIMIT_PER_SHARD, LIMIT_PER_SHARD)
    epochs = [(r["stage"], r["epoch"]) for r in log if "stage" in r and "epoch" in r and "event" not in r]
    assert epochs == [("teacher", 1), ("stage1", 1), ("stage2", 1)]
    assert log[-1]["event"] == "done"
    for f in (
        "teacher.pt",
        "stage1.pt",
        "student.pt",
        "results.json",
        "recipe.json",
        "teacher.ckpt",
        "stage1.ckpt",
        "stage2.ckpt",
    ):
        assert (short_build.run_dir / f).is_file(), f


def test_bundle_modes_and_bytes(short_build):
    b = short_build.bundle
    assert b.wire_spec["shape"] == [12, 8, 8]
    got = [(m.bits, m.bytes_per_frame, m.channels) for m in b.modes]
    assert got == [(8, 768, 12), (4, 384, 12), (2, 192, 12)]  # 12*8*8 codes at 8/4/2 bits
    for m, r in zip(b.modes, short_build.results["modes"]):
        assert (m.bits, m.scale, m.zero_point, m.accuracy) == (r["bits"], r["scale"], r["zero_point"], r["accuracy"])
    assert b.manifest["teacher_accuracy"] == short_build.results["teacher_accuracy"]
    # The codec's own encoding takes exactly the bytes the manifest promises.
    z = np.random.default_rng(0).normal(size=(12, 8, 8)).astype(np.float32)
    for m in b.modes:
        _, payload = codec.encode(z, m)
        assert len(payload) == m.bytes_per_frame


# -- resume -----------------------------------------------------------------------------------------


def _copy_run(short_build, dst: Path) -> Path:
    base = short_build.run_dir.parent
    shutil.copytree(base / "run", dst / "run")
    if (base / "cache").is_dir():
        shutil.copytree(base / "cache", dst / "cache")
    return dst / "run"


def test_rerun_skips_finished_steps(short_build, tmp_path):
    run = _copy_run(short_build, tmp_path)
    before = len(_log(run))

    def trained():  # the training steps' artefacts (student.pt is re-written by calibration and evaluation)
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.glob("*.pt") if p.name != "student.pt"}

    artefacts = trained()
    res = run_recipe(short_recipe(), run, device="cpu", limit_per_shard=LIMIT_PER_SHARD, workers=1)
    new = _log(run)[before:]
    assert not [r for r in new if "epoch" in r], new  # nothing trained again
    assert artefacts and trained() == artefacts  # nor any training artefact re-written
    assert _strip(res) == _strip(short_build.results)
    assert _strip(json.loads((run / "results.json").read_text())) == _strip(short_build.results)


def test_rerun_resumes_a_stage_from_its_checkpoint(short_build, tmp_path):
    run = _copy_run(short_build, tmp_path)
    # Stopped after stage 2's last epoch checkpoint, before its artefact (stage2.pt) and student.pt
    # were written.
    (run / "stage2.pt").unlink()
    (run / "student.pt").unlink()
    (run / "results.json").unlink()
    before = len(_log(run))
    res = run_recipe(short_recipe(), run, device="cpu", limit_per_shard=LIMIT_PER_SHARD, workers=1)
    new = _log(run)[before:]
    assert {"event": "resume", "stage": "stage2", "epoch": 1}.items() <= next(
        r for r in new if r.get("event") == "resume"
    ).items()
    assert not [r for r in new if "epoch" in r and "event" not in r]
    assert _strip(res) == _strip(short_build.results)
    assert (run / "student.pt").is_file()


def test_pretrained_teacher_used_as_is_leaves_teacher_pt(tmp_path):
    """A pretrained teacher with no adaptation schedule must still leave teacher.pt: export reads
    the reference model from it (it used to be written only after training)."""
    from edgesplit.builder.recipe import load_recipe
    from edgesplit.builder.zoo import load_pretrained
    from edgesplit.data.sources import data_root

    weights = data_root() / "teachers" / "resnet56-4bfd9763.th"
    if not weights.is_file():
        pytest.fail(f"shared ResNet-56 teacher not found at {weights} (set EDGESPLIT_DATA)")
    r = load_recipe(ROOT / "models" / "recipes" / "cifar10-sharedteacher-bottlefit-cpu.yaml")
    r.teacher.train = None  # the shared teacher exactly as downloaded
    for c in (r.stage1, r.stage2):
        c.epochs, c.batch = 1, 32
    run = tmp_path / "run"
    res = run_recipe(r, run, device="cpu", limit_per_shard=8, workers=1)  # 40 train, 8 test images
    assert (run / "teacher.pt").is_file()
    saved = torch.load(run / "teacher.pt", map_location="cpu", weights_only=True)
    ref = load_pretrained("resnet56_cifar", weights, 10).state_dict()
    assert saved.keys() == ref.keys() and all(torch.equal(saved[k], ref[k]) for k in ref)
    assert res["teacher_accuracy"] == res["teacher_pretrained_accuracy"]
    assert not [x for x in _log(run) if x.get("stage") == "teacher"]  # nothing trained


# -- calibration and fake quantization ---------------------------------------------------------------


@pytest.fixture(scope="module")
def student(short_build):
    model, state = load_student(short_build.student_path)
    return model, state


@pytest.fixture(scope="module")
def wire_sample(student):
    """Real bottleneck values: the trained encoder on real CIFAR-10 training JPEGs."""
    model, _ = student
    x, y = load_split("cifar10", "train", 32, None, limit_per_shard=20)
    return collect_wire(model, DeviceLoader(x, y, 50, torch.device("cpu"), MEAN, STD), max_batches=10)


def _mse(z, bits, scale, zp) -> float:
    zhat = codec.dequantize(codec.quantize(z, bits, scale, zp), scale, zp)
    return float(np.mean((zhat.astype(np.float64) - z) ** 2))


def test_calibration_beats_min_max_on_heavy_tails(wire_sample):
    z = wire_sample
    assert z.size == 100 * 12 * 8 * 8
    kurtosis = float(np.mean((z - z.mean()) ** 4) / np.var(z) ** 2)
    assert kurtosis > 3.0, f"wire sample is not heavy-tailed (kurtosis {kurtosis:.2f}): the premise fails"
    for bits in (8, 4, 2):
        c = calibrate(z, bits)
        assert c["bits"] == bits and c["scale"] > 0 and 0 <= c["zero_point"] < 2**bits
        # Zero survives quantization exactly (ReLU'd decoders see true zeros).
        zero = codec.dequantize(
            codec.quantize(np.zeros(1, np.float32), bits, c["scale"], c["zero_point"]), c["scale"], c["zero_point"]
        )
        assert zero[0] == 0.0
        lo, hi = min(float(z.min()), 0.0), max(float(z.max()), 0.0)
        s = (hi - lo) / (2**bits - 1)
        zp = int(round(-lo / s))
        minmax = _mse(z, bits, s, zp)
        chosen = _mse(z, bits, c["scale"], c["zero_point"])
        assert chosen == pytest.approx(c["mse"], rel=1e-3)  # the figure it reports is what the codec gets
        if bits <= 4:
            assert chosen < 0.9 * minmax, (bits, chosen, minmax)
            assert c["clip_percentile"] < 100.0
        else:
            assert chosen <= minmax * (1 + 1e-6)


def test_fake_quant_at_eval_equals_the_wire_codec(short_build, wire_sample):
    z = torch.from_numpy(wire_sample[: 40 * 768].reshape(40, 12, 8, 8).copy())
    for m in short_build.bundle.modes:
        fq = FakeQuant(bits=8)
        fq.set_params(m.scale, m.zero_point, m.bits)
        fq.eval()
        with torch.no_grad():
            got = fq(z).numpy()
        q = codec.quantize(z.numpy(), m.bits, m.scale, m.zero_point)
        want = codec.dequantize(q, m.scale, m.zero_point)
        # Same codes ...
        codes = np.rint(got / np.float32(m.scale)) + m.zero_point
        np.testing.assert_array_equal(codes, q.astype(np.float32))
        # ... and the same values, up to the last-bit rounding of the straight-through sum.
        np.testing.assert_allclose(
            got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * float(np.abs(z.numpy()).max())
        )
        assert len(np.unique(q)) <= 2**m.bits
    # Without fixed parameters the eval-mode quantizer is the identity; in training it quantizes
    # with its tracked range.
    fq = FakeQuant(bits=2).eval()
    assert torch.equal(fq(z), z)
    fq.train()
    assert len(torch.unique(fq(z))) <= 4


def test_load_student_round_trip(short_build, student, tmp_path):
    model, state = student
    r = short_recipe()
    assert model.cfg == student_config(r)
    assert not model.training
    assert set(state["calibration"]) == {"8", "4", "2"}
    assert state["results"] == short_build.results and state["classes"][0] == "airplane"
    # Only the stages that run are in the checkpoint: stem and layer1 were replaced by the encoder.
    assert not any(k.startswith(("backbone.conv1", "backbone.layer1.")) for k in state["model"])
    # Save the loaded model the way the pipeline does and load it again: identical.
    again = tmp_path / "student.pt"
    torch.save({**state, "model": model.state_dict()}, again)
    model2, _ = load_student(again)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # The reloaded student reproduces the accuracy the run recorded for each mode, on the same frames.
    xte, yte = load_split("cifar10", "test", 32, None, limit_per_shard=LIMIT_PER_SHARD)
    loader = DeviceLoader(xte, yte, 500, torch.device("cpu"), MEAN, STD)
    for m in short_build.results["modes"]:
        c = state["calibration"][str(m["bits"])]
        model2.quant.set_params(c["scale"], c["zero_point"], m["bits"])
        assert evaluate(model2, loader, torch.device("cpu")) == m["accuracy"]
    # A student.pt whose weights do not fit its config is refused (strict load).
    bad = dict(state)
    bad["config"] = {**state["config"], "bottleneck_channels": 16}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError):
        load_student(tmp_path / "bad.pt")
    assert isinstance(model2, BottleFitSplit)


# -- edgesplit eval ---------------------------------------------------------------------------------


EVAL_FRAMES, JPEG_FRAMES = 64, 32


@pytest.fixture(scope="module")
def eval_json(short_build):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "eval",
            "--bundle",
            str(short_build.bundle_dir),
            "--data",
            "cifar10:test",
            "--frames",
            str(EVAL_FRAMES),
            "--jpeg-frames",
            str(JPEG_FRAMES),
            "--threads",
            "1",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_eval_json_keys(short_build, eval_json):
    res = eval_json
    for k in (
        "accuracy",
        "teacher_accuracy",
        "bytes_per_frame",
        "input_jpeg_bytes_median",
        "frames",
        "jpeg_baseline",
        "jpeg_accuracy_at_bytes",
    ):
        assert k in res, k
    assert res["frames"] == EVAL_FRAMES and res["jpeg_frames"] == JPEG_FRAMES
    assert res["bundle_hash"] == short_build.bundle.hash and res["mode"] == "c12-b4"
    assert res["bytes_per_frame"] == 384
    assert [(m["bits"], m["bytes_per_frame"]) for m in res["modes"]] == [(8, 768), (4, 384), (2, 192)]
    grid = res["jpeg_baseline"]
    assert grid and all(set(g) == {"side", "quality", "bytes_median", "accuracy"} for g in grid)
    assert {g["side"] for g in grid} == {16, 24, 32}  # never above the 32-px input
    fits = [g["accuracy"] for g in grid if g["bytes_median"] <= res["bytes_per_frame"]]
    assert res["jpeg_accuracy_at_bytes"] == (max(fits) if fits else None)
    for side in (16, 24, 32):  # higher quality, more bytes
        row = sorted((g for g in grid if g["side"] == side), key=lambda g: g["quality"])
        assert row[0]["bytes_median"] < row[-1]["bytes_median"]


def test_eval_accuracy_recomputed_independently(short_build, eval_json):
    b = short_build.bundle
    samples = list(take(open_source("cifar10:test"), EVAL_FRAMES))
    y = np.asarray([s.label for s in samples])
    x = np.stack([preprocess(s.data, b.input_spec) for s in samples])
    head = create_engine(b.file("head"), "ort", threads=1)
    tail = create_engine(b.file("tail"), "ort", threads=1)
    full = create_engine(b.file("full"), "ort", threads=1)
    z = head.run1(x)
    by_bits = {m["bits"]: m for m in eval_json["modes"]}
    for m in b.modes:
        # The whole batch at once through quantize/dequantize (eval goes frame by frame through
        # encode/pack/unpack/decode): the same numbers must come out.
        zhat = codec.dequantize(codec.quantize(z, m.bits, m.scale, m.zero_point), m.scale, m.zero_point)
        acc = float(np.mean(tail.run1(zhat).argmax(1) == y))
        assert by_bits[m.bits]["accuracy"] == acc, m.name
        if m.id == b.default_mode.id:
            assert eval_json["accuracy"] == acc
    assert eval_json["teacher_accuracy"] == float(np.mean(full.run1(x).argmax(1) == y))
    assert eval_json["input_jpeg_bytes_median"] == float(np.median([len(s.data) for s in samples]))


def test_stage3_continues_stage2_at_lower_bits(short_build, tmp_path):
    """The optional stage 3 starts from stage 2's artefact (stage 2 is not trained again), trains at
    ``stage3_bits`` and leaves stage3.pt and a new student."""
    from edgesplit.builder.recipe import TrainCfg

    run = _copy_run(short_build, tmp_path)
    (run / "student.pt").unlink()
    (run / "results.json").unlink()
    r = short_recipe()
    r.stage3, r.stage3_bits = TrainCfg(epochs=1, lr=0.005, batch=32, eval_every=1), 2
    before = len(_log(run))
    res = run_recipe(r, run, device="cpu", limit_per_shard=LIMIT_PER_SHARD, workers=1)
    trained = [x["stage"] for x in _log(run)[before:] if "epoch" in x and "event" not in x]
    assert trained == ["stage3"]
    assert (run / "stage3.pt").is_file() and (run / "student.pt").is_file()
    assert {m["bits"] for m in res["modes"]} == {8, 4, 2}
