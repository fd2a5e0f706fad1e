"""The user-facing tools on a real (short-trained) bundle: the demo, `bench e2e`, the torch tail
backend against ONNX Runtime, `zoo`, and the top-level CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from build_fixtures import one_torch_thread, short_build  # noqa: F401  (fixtures)

from edgesplit.data.sources import open_source, take
from edgesplit.data.transforms import preprocess
from edgesplit.engine import EngineError, create_engine


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("train", "export", "eval", "serve", "agent", "demo", "bench", "inspect", "zoo"):
        assert f"  {cmd} " in out.stdout
    bad = run_cli("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_demo_json_on_a_real_bundle(short_build):
    out = run_cli(
        "demo", "--bundle", str(short_build.bundle_dir), "--source", "cifar10:test", "--frames", "60", "--json"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["frames"] == 60 and r["ok"] == 60 and r["errors"] == {}
    assert r["bytes_per_frame"] == short_build.bundle.default_mode.bytes_per_frame
    assert r["input_jpeg_bytes_median"] > r["bytes_per_frame"]
    lat = r["latency_ms"]
    for stage in ("head", "encode", "server compute", "round trip", "end to end"):
        assert lat[stage]["p95"] >= lat[stage]["p50"] > 0, stage
    # "link + runtime" is each frame's round trip measured by the agent less the queue and compute
    # times the server reports for it: positive only if the server's clocks and units agree with
    # the agent's (a server reporting microseconds as milliseconds, or timing from before the
    # request arrived, makes it negative)
    assert lat["link + runtime"]["p50"] > 0 and lat["server queue"]["p50"] >= 0
    # the same 60 frames through the bundle's ONNX files directly (no agent, no server, no wire):
    # the same answers, give or take one near-tie frame between batched and single runs
    from edgesplit.bench.evaluate import evaluate_bundle

    direct = evaluate_bundle(
        short_build.bundle, "cifar10:test", frames=60, jpeg_frames=None, threads=1, jpeg_grid=False
    )
    assert abs(r["accuracy"] - direct["accuracy"]) <= 1 / 60 + 1e-9, (r["accuracy"], direct["accuracy"])


def test_demo_table_mentions_the_figures(short_build):
    out = run_cli("demo", "--bundle", str(short_build.bundle_dir), "--source", "cifar10:test", "--frames", "20")
    assert out.returncode == 0, out.stderr[-2000:]
    for word in ("accuracy", "bytes per frame", "input JPEG", "end to end", "p95"):
        assert word in out.stdout


def test_demo_runs_the_shipped_u_shaped_bundle_with_the_tail_on_the_device():
    """The SFPrompt bundle the project ships: the answer comes down as the body's output in the
    mode's dtype and the tail runs in the agent, so the demo reports the bytes down and the
    device's tail, and its accuracy is the bundle's own offline accuracy on the same frames."""
    from pathlib import Path

    from edgesplit.bench.evaluate import evaluate_bundle
    from edgesplit.bundle import Bundle

    root = Path(__file__).resolve().parents[1] / "models" / "imagenette32-sfprompt"
    out = run_cli("demo", "--bundle", str(root), "--frames", "40", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    b = Bundle.load(root)
    T, D = b.wire_spec["shape"]
    assert r["ok"] == 40 and r["errors"] == {} and r["source"] == "imagenette:val"
    assert r["bytes_per_frame"] == r["bytes_down_per_frame"] == T * D * 2  # f16 both ways, the default mode
    lat = r["latency_ms"]
    assert lat["tail (device)"]["p50"] > 0
    assert lat["end to end"]["p50"] > lat["round trip"]["p50"]  # the frame is finished after the answer
    direct = evaluate_bundle(b, "imagenette:val", frames=40, jpeg_frames=None, threads=1, jpeg_grid=False)
    default = next(m for m in direct["modes"] if m["id"] == b.default_mode.id)
    assert r["accuracy"] == pytest.approx(default["accuracy"])


def test_bench_e2e_json_keys(short_build):
    out = run_cli("bench", "e2e", "--bundle", str(short_build.bundle_dir), "--frames", "60", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    for k in (
        "frames",
        "bytes_per_frame",
        "e2e_ms_p50",
        "e2e_ms_p95",
        "head_ms_p50",
        "tail_ms_p50",
        "raw_rtt_ms_p50",
        "overhead_ratio",
        "agent_rss_mb",
    ):
        assert k in r, k
    assert r["frames"] == 60 and r["errors"] == 0
    assert r["head_ms_p50"] > 0 and r["encode_ms_p50"] > 0 and r["tail_ms_p50"] > 0
    # every frame's round trip (agent clock) holds the tail's compute time (server clock), so the
    # sorted round trips lie above the sorted compute times and the medians keep that order: fails
    # if the server's compute time is mis-measured or in the wrong unit
    assert r["rtt_ms_p50"] > r["tail_ms_p50"]
    # the overhead is what the end-to-end median leaves after head and tail (BENCHMARKS.md)
    overhead = r["e2e_ms_p50"] - r["head_ms_p50"] - r["tail_ms_p50"]
    assert r["overhead_ratio"] == pytest.approx(overhead / r["raw_rtt_ms_p50"])
    assert r["bytes_per_frame"] == short_build.bundle.default_mode.bytes_per_frame
    assert r["raw_rtt_ms_p50"] > 0 and r["overhead_ratio"] > 0
    assert 10 < r["agent_rss_mb"] < 1000
    assert r["agent_torch_loaded"] is False  # the agent process never imported torch


def test_torch_tail_matches_onnx_tail(short_build, tmp_path):
    from edgesplit.builder.export import export_bundle

    b = export_bundle(short_build.run_dir / "student.pt", tmp_path / "b", check_frames=16, torch_tail=True)
    assert b.has("tail_torch")
    x = np.stack([preprocess(s.data, b.input_spec) for s in take(open_source("cifar10:test"), 16)])
    z = create_engine(b.file("head"), "ort").run1(x)
    ort_logits = create_engine(b.file("tail"), "ort").run1(z)
    torch_logits = create_engine(b.file("tail_torch"), "torch", device="cpu").run1(z)
    assert torch_logits.shape == ort_logits.shape
    scale = np.abs(ort_logits).max()
    assert np.abs(torch_logits - ort_logits).max() / scale < 1e-2  # ONNX weights are stored as fp16
    assert np.mean(torch_logits.argmax(1) == ort_logits.argmax(1)) >= 0.9
    # a batch size the program was not traced with still runs (dynamic batch)
    assert create_engine(b.file("tail_torch"), "torch", device="cpu").run1(z[:3]).shape[0] == 3


def test_unknown_engine_backend_is_an_error(short_build):
    with pytest.raises(EngineError, match="unknown engine backend"):
        create_engine(short_build.bundle.file("tail"), "tpu")
    with pytest.raises(EngineError, match="TensorRT"):
        create_engine(short_build.bundle.file("tail"), "tensorrt")
    with pytest.raises(EngineError, match="could not load"):
        create_engine(short_build.bundle.root / "manifest.json", "ort")


def test_zoo_list_and_eval_shared_teacher():
    out = run_cli("zoo", "list")
    assert out.returncode == 0 and "resnet56_cifar" in out.stdout and "layer1" in out.stdout
    from build_fixtures import require_cifar

    require_cifar()
    out = run_cli(
        "zoo",
        "eval",
        "resnet56_cifar",
        "--weights",
        "teachers/resnet56-4bfd9763.th",
        "--data",
        "cifar10:test",
        "--frames",
        "200",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["frames"] == 200 and 0.7 < r["accuracy"] < 0.95  # the data README: about 83% on this shard


def test_train_refuses_a_bad_recipe_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: cifar10\nfrobnicate: 1\n")
    out = run_cli("train", str(bad), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("edgesplit train: ") and "frobnicate" in out.stderr
    missing = run_cli("train", str(tmp_path / "nope.yaml"), timeout=120)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
