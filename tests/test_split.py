"""Generic split (edgesplit.builder.split): cut points, head-then-tail == full on real images, ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgesplit.builder.split import (
    SplitError,
    _real_images,
    candidate_cuts,
    export_split,
    split_at,
    split_main,
    trace,
    verify_split,
)
from edgesplit.builder.zoo import create_model
from edgesplit.engine import create_engine


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", 10).eval()
    return model, trace(model, torch.zeros(2, 3, 32, 32))


@pytest.fixture(scope="module")
def mobilenet():
    # The zoo's MobileNetV2 (no torchvision) at 64x64: adaptive pooling makes any input size work,
    # and the small side keeps the test fast.
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10).eval()
    return model, trace(model, torch.zeros(2, 3, 64, 64))


@pytest.fixture(scope="module")
def cifar_images():
    return _real_images("cifar10:test", 32, 16)


def test_resnet20_cut_points_and_sizes(resnet20, cifar_images):
    _, gm = resnet20
    cuts = candidate_cuts(gm)
    assert len(cuts) > 10
    for c in cuts:
        assert c.bytes_per_frame == int(np.prod(c.shape)) * 4 and c.bytes_per_frame_8bit == int(np.prod(c.shape))
    # Block boundaries are cuts; the end of each stage carries the stage's shape.
    last_of = {
        stage: [c for c in cuts if c.module.startswith(stage + ".")][-1] for stage in ("layer1", "layer2", "layer3")
    }
    assert last_of["layer1"].shape == (16, 32, 32)
    assert last_of["layer2"].shape == (32, 16, 16)
    assert last_of["layer3"].shape == (64, 8, 8)
    # The listed shape is what the head really produces on real frames.
    for c in (cuts[0], last_of["layer2"], cuts[-1]):
        head, _ = split_at(gm, None, c.name)
        assert tuple(head(cifar_images).shape) == (len(cifar_images), *c.shape)


def test_resnet20_every_cut_reproduces_the_model(resnet20, cifar_images):
    model, gm = resnet20
    for c in candidate_cuts(gm):
        head, tail = split_at(gm, None, c.name)
        check = verify_split(model, head, tail, cifar_images)
        assert check["max_abs_diff"] < 1e-4, (c.name, check)
        assert check["top1_agreement"] == 1.0


def test_bad_cut_names_list_the_valid_ones(resnet20):
    _, gm = resnet20
    cuts = {c.name for c in candidate_cuts(gm)}
    with pytest.raises(SplitError, match="no node 'layer9'.*valid cut points: .*relu"):
        split_at(gm, None, "layer9")
    # Inside a residual block the skip connection is a second live tensor.
    inside = next(
        n.name for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("conv2d") and n.name not in cuts
    )
    with pytest.raises(SplitError, match=f"'{inside}' is not a single-tensor cut .*valid cut points"):
        split_at(gm, None, inside)


def test_mobilenetv2_split_exports_and_matches_in_onnxruntime(mobilenet, tmp_path):
    model, gm = mobilenet
    cuts = candidate_cuts(gm)
    x = _real_images("imagenette:val", 64, 8)
    narrow = min((c for c in cuts if c.module.startswith("layer2")), key=lambda c: c.bytes_per_frame)
    assert narrow.shape == (32, 8, 8)  # the projection out of layer2 (32 channels at stride 8)
    head, tail = split_at(gm, None, narrow.name)
    check = verify_split(model, head, tail, x)
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0

    report = export_split(head, tail, x[:2], tmp_path, weights="fp32")
    assert report["head"]["max_abs_diff_vs_torch"] < 1e-3 and report["tail"]["max_abs_diff_vs_torch"] < 1e-3
    # The ONNX pair end to end on other frames and batch size than the export example.
    z = create_engine(tmp_path / "head.onnx", "ort").run1(x.numpy())
    logits = create_engine(tmp_path / "tail.onnx", "ort").run1(z)
    with torch.no_grad():
        ref = model(x).numpy()
    assert z.shape == (len(x), *narrow.shape)
    assert np.max(np.abs(logits - ref)) < 1e-3


def test_tail_leaves_the_callers_tensor_alone(mobilenet):
    # MobileNetV2's ReLU6 is in place: cut just before one, the tail must not overwrite its input.
    _, gm = mobilenet
    head, tail = split_at(gm, None, "batch_norm")
    z = head(torch.randn(2, 3, 64, 64))
    before = z.clone()
    tail(z)
    assert torch.equal(z, before)


def test_cli_list_and_split(tmp_path, capsys):
    assert split_main(["resnet20_cifar", "--list", "--json"]) == 0
    cuts = json.loads(capsys.readouterr().out)
    name = [c for c in cuts if c["module"].startswith("layer1.")][-1]["name"]

    assert split_main(["resnet20_cifar", "--at", "conv2d_1", "--out", str(tmp_path)]) == 2
    assert "not a single-tensor cut" in capsys.readouterr().err

    assert split_main(["resnet20_cifar", "--at", name, "--out", str(tmp_path), "--frames", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cut"]["shape"] == [16, 32, 32] and res["check"]["top1_agreement"] == 1.0
    # float16-stored weights: relative to the output's scale the ONNX graphs stay close to torch.
    assert res["onnx"]["head"]["max_abs_diff_vs_torch"] < 5e-2
    assert json.loads((tmp_path / "split.json").read_text())["cut"]["name"] == name
    assert (tmp_path / "head.onnx").stat().st_size > 0 and (tmp_path / "tail.onnx").stat().st_size > 0
