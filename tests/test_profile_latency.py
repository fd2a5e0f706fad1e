"""edgesplit profile latency: ONNX Runtime per-node profiles and latency distributions of the shipped
CIFAR bundle on real frames, torch.profiler on a zoo model, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesplit.profile.cli import profile_main
from edgesplit.profile.latency import profile_onnx_nodes, real_frames

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "cifar10-resnet20-bottlefit"
SPEC = {"shape": [3, 32, 32], "resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_bundle_profile_json_per_node_and_distributions(tmp_path, capsys):
    png = tmp_path / "latency.png"
    assert (
        profile_main(
            [
                "latency",
                "--bundle",
                str(BUNDLE),
                "--batch-sizes",
                "1,3",
                "--threads",
                "1,2",
                "--runs",
                "5",
                "--json",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "cifar10:test"

    assert set(res["per_node"]) == {"head", "tail", "full"}
    for role, prof in res["per_node"].items():
        assert prof["runs"] == 5 and prof["batch_size"] == 1 and prof["threads"] == 1
        names = [n["name"] for n in prof["nodes"]]
        assert names and len(names) == len(set(names))
        assert "Conv" in {o["op"] for o in prof["ops"]}
        # Kernels run inside run(): their sum is most of a run and never much more than one
        # (medians of different runs, so a little slack).
        assert 0.2 * prof["session_us"] < prof["nodes_sum_us"] <= 1.1 * prof["session_us"], (role, prof)
        assert 0.2 < prof["kernel_share"] <= 1.0
        assert abs(sum(o["median_us"] for o in prof["ops"]) - prof["nodes_sum_us"]) <= 0.5 * prof["nodes_sum_us"]
    # The full model has more layers than the head, and they all show up.
    assert len(res["per_node"]["full"]["nodes"]) > len(res["per_node"]["head"]["nodes"])

    assert set(res["distributions"]) == {"head", "tail", "full"}
    for rows in res["distributions"].values():
        assert sorted((r["batch_size"], r["threads"]) for r in rows) == [(1, 1), (1, 2), (3, 1), (3, 2)]
        for r in rows:
            assert r["runs"] == 5 and r["p50_ms"] > 0
            assert r["frames_per_s"] > 0

    assert res["plot"] == str(png)  # matplotlib: the profile extra of the README install
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ort_trace_holds_only_the_timed_runs():
    frames = real_frames(SPEC, "cifar10:test", 2)
    prof = profile_onnx_nodes(BUNDLE / "head.onnx", frames, threads=1, runs=4, warmup=2)
    assert prof["runs"] == 4 and prof["batch_size"] == 2
    # Every node ran in every run, so no median is zero.
    assert all(n["median_us"] > 0 for n in prof["nodes"])


def test_torch_model_profile_per_module_and_op(capsys):
    assert (
        profile_main(
            ["latency", "--model", "resnet20_cifar", "--batch-sizes", "2", "--threads", "1", "--runs", "3", "--json"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)["torch"]
    modules = {m["name"]: m for m in res["modules"]}
    assert {"conv1", "bn1", "linear", "layer3.2.conv2"} <= set(modules)
    assert all(m["calls_per_run"] == 1 and m["mean_us"] > 0 for m in modules.values())
    assert any(o["op"].startswith("aten::") and "conv" in o["op"] for o in res["ops"])
    assert [(r["batch_size"], r["threads"]) for r in res["distributions"]] == [(2, 1)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["latency", "--threads", "1"], "give --bundle, --model or both"),
        (["latency", "--bundle", str(BUNDLE), "--threads", "0"], "positive integers"),
        (["latency", "--bundle", str(BUNDLE), "--batch-sizes", "1,x"], "comma-separated integers"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        profile_main(argv)
