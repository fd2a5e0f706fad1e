"""Shared helpers for the control-plane tests (real traces, a bundle-like modes table) and the
tests of the modes table itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesplit.control.modes import FALLBACK, ModeSpec, ModesTable, modes_from_manifest, modes_table
from edgesplit.control.traces import read_trace, traces_dir

TRACES = traces_dir()
MAHIMAHI = TRACES / "mahimahi-cellular"
HSDPA = TRACES / "hsdpa-norway-3g"
MODELS = Path(__file__).resolve().parents[1] / "models"
# The shipped bundles, when their training has finished (they are preferred to the table below).
SHIPPED = ("cifar10-resnet20-bottlefit", "imagenette-resnet18-bottlefit")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real trace data not found: {path} (set EDGESPLIT_DATA to the shared data folder)")
    return path


def trace(name: str):
    return read_trace(need(MAHIMAHI / name))


def bundle_like_modes() -> ModesTable:
    """The modes table of a shipped bundle when one exists (its measured bytes, accuracies and
    head latency), else one shaped like them: a 32x7x7 bottleneck at 8/4/2 bits (1568/784/392
    bytes), accuracies as BottleFit measures them (8 and 4 bits within half a point of each
    other, 2 bits a few points lower), head latency of a Raspberry-Pi-class device."""
    for name in SHIPPED:
        p = MODELS / name / "manifest.json"
        if p.exists():
            return modes_from_manifest(p)
    return ModesTable(
        [
            ModeSpec(0, "c32-b8", 1568, 0.842, 6.0),
            ModeSpec(1, "c32-b4", 784, 0.836, 6.0),
            ModeSpec(2, "c32-b2", 392, 0.781, 6.0),
        ],
        teacher_accuracy=0.846,
        device="rpi4-cpu",
        name="bundle-like",
    )


def test_modes_table_from_manifest_dict_and_mode_objects(tmp_path):
    m = {
        "name": "x",
        "teacher_accuracy": 0.9,
        "modes": [
            {
                "id": 0,
                "name": "c8-b8",
                "bytes_per_frame": 512,
                "accuracy": 0.88,
                "head_ms": {"x86_64-cpu": 0.4, "rpi4-cpu": 5.0},
            },
            {
                "id": 1,
                "name": "c8-b2",
                "bytes_per_frame": 128,
                "accuracy": 0.80,
                "head_ms": {"x86_64-cpu": 0.4, "rpi4-cpu": 5.0},
            },
            {
                "id": 2,
                "name": "c8-b4",
                "bytes_per_frame": 256,
                "accuracy": 0.87,
                "head_ms": {"x86_64-cpu": 0.4, "rpi4-cpu": 5.0},
            },
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    t = modes_from_manifest(tmp_path, device="rpi4-cpu")
    assert [x.id for x in t.ranked] == [0, 2, 1] and t.smallest.id == 1
    assert t.by_id[0].head_ms == 5.0 and t.teacher_accuracy == 0.9 and t.accuracy(FALLBACK) == 0.9
    with pytest.raises(ValueError, match="device profile"):
        modes_from_manifest(m)  # two profiles: the caller must say which
    with pytest.raises(ValueError, match="teacher_accuracy"):
        modes_from_manifest({"modes": m["modes"]}, device="rpi4-cpu")

    class ModeLike:  # what edgesplit.bundle.Mode looks like to the control plane
        def __init__(self, d):
            self.__dict__.update(d)

    t2 = modes_table([ModeLike(d) for d in m["modes"]], 0.9, device="x86_64-cpu")
    assert t2.by_id[2].head_ms == 0.4 and t2.by_id[2].bytes_per_frame == 256
    with pytest.raises(ValueError, match="accuracy"):
        modes_table([dict(m["modes"][0], accuracy=None)], 0.9, device="x86_64-cpu")


def test_bundle_like_modes_are_usable():
    t = bundle_like_modes()
    assert len(t) >= 2 and t.smallest.bytes_per_frame < max(m.bytes_per_frame for m in t)
    assert all(0 < m.accuracy <= 1 for m in t) and 0 < t.teacher_accuracy <= 1


def test_control_plane_imports_neither_torch_nor_onnxruntime():
    import subprocess
    import sys

    code = (
        "import sys, edgesplit.control, edgesplit.control.simulator; "
        "bad = [m for m in ('torch', 'onnxruntime', 'zmq') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_feedback_from_an_agent_frame_result():
    from edgesplit.control.policy import Feedback
    from edgesplit.edge.agent import FrameResult

    ok = FrameResult(
        id=1,
        key="k",
        mode=2,
        encode_ms=0.3,
        bytes_sent=392,
        header_bytes=120,
        rtt_ms=48.0,
        server_queue_ms=1.5,
        server_compute_ms=2.5,
        server_ms=4.5,
    )
    fb = Feedback.from_frame_result(ok, t_send_s=10.0)
    assert (
        fb.t_result_s == 10.048
        and fb.nbytes == 512
        and fb.server_time_ms == 4.5
        and fb.mode == 2
        and fb.encode_ms == 0.3
    )
    assert Feedback.from_frame_result(FrameResult(id=2, key="k", error="TIMEOUT"), t_send_s=10.0) is None


def test_simulator_command_line(tmp_path, capsys):
    from edgesplit.control.simulator import main

    t = bundle_like_modes()
    m = {
        "name": "cli",
        "teacher_accuracy": t.teacher_accuracy,
        "modes": [
            {
                "id": x.id,
                "name": x.name,
                "bytes_per_frame": x.bytes_per_frame,
                "accuracy": x.accuracy,
                "head_ms": {"dev": x.head_ms},
            }
            for x in t
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    rc = main(
        [
            str(need(MAHIMAHI / "TMobile-LTE-short.up")),
            str(tmp_path),
            "--fallback-ms",
            "120",
            "--deadline-ms",
            "40",
            "--duration-s",
            "20",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and "oracle" in out and all(v["frames"] == 600 for v in out.values())
    assert out["oracle"]["hit_rate"] >= max(v["hit_rate"] for v in out.values())
