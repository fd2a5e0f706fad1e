"""``teacher.init: bundle``: a recipe's teacher rebuilt from a shipped bundle's full.onnx, its folded
BatchNorms undone with statistics from real images, the result checked against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from edgesplit.builder.data import MEAN, STD, load_split
from edgesplit.builder.export_common import export_onnx, store_weights_fp16
from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.teacher_from_bundle import BundleTeacherError, conv_bn_pairs, teacher_from_bundle
from edgesplit.builder.zoo import create_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "imagenette-resnet18-bottlefit"


def normalised(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    x, _ = load_split("cifar10", "train", 32, limit_per_shard=16)  # 80 real training images
    return normalised(x)


def test_bn_pairs_are_read_from_the_graph_not_from_names():
    pairs = conv_bn_pairs(create_model("resnet20_cifar", 10), 32)
    assert pairs["conv1"] == "bn1"
    assert pairs["layer1.0.conv2"] == "layer1.0.bn2"
    bns = [n for n, m in create_model("resnet20_cifar", 10).named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sorted(pairs.values()) == sorted(bns)  # every BN is fed by exactly one conv


def test_rebuilt_teacher_computes_what_the_exported_model_does(tmp_path, cifar_images):
    torch.manual_seed(0)
    original = create_model("resnet20_cifar", 10)
    for m in original.modules():  # non-trivial BN statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    original.eval()
    export_onnx(original, cifar_images[:2], tmp_path / "full.onnx", "image", "logits")
    rebuilt = teacher_from_bundle("resnet20_cifar", tmp_path, 10, cifar_images[:64]).eval()
    with torch.no_grad():
        want, got = original(cifar_images).numpy(), rebuilt(cifar_images).numpy()
    assert np.abs(want - got).max() < 1e-3 * max(1.0, np.abs(want).max())
    assert np.abs(got - ort_logits(tmp_path / "full.onnx", cifar_images)).max() < 1e-3 * max(1.0, np.abs(want).max())
    # the BNs now hold the statistics of their inputs: in train mode a batch renormalises to the same function
    bn = rebuilt.bn1
    with torch.no_grad():
        c = rebuilt.conv1(cifar_images[:64])
    assert torch.allclose(bn.running_mean, c.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, c.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-5)


def test_fp16_weights_are_widened(tmp_path, cifar_images):
    torch.manual_seed(1)
    original = create_model("resnet20_cifar", 10).eval()
    export_onnx(original, cifar_images[:2], tmp_path / "full.onnx", "image", "logits")
    store_weights_fp16(tmp_path / "full.onnx")
    rebuilt = teacher_from_bundle("resnet20_cifar", tmp_path, 10, cifar_images[:32]).eval()
    with torch.no_grad():
        got = rebuilt(cifar_images).numpy()
    assert np.abs(got - ort_logits(tmp_path / "full.onnx", cifar_images)).max() < 1e-3


def test_another_architecture_is_refused_by_name(tmp_path, cifar_images):
    export_onnx(create_model("resnet20_cifar", 10).eval(), cifar_images[:2], tmp_path / "full.onnx", "image", "logits")
    with pytest.raises(BundleTeacherError, match="does not hold these weights"):
        teacher_from_bundle("resnet56_cifar", tmp_path, 10, cifar_images[:8])
    with pytest.raises(BundleTeacherError, match="no full.onnx"):
        teacher_from_bundle("resnet20_cifar", tmp_path / "nowhere", 10, cifar_images[:8])


def test_the_shipped_imagenette_teacher_is_rebuilt_exactly():
    """The teacher the entropy recipe trains against: the shipped bundle's full.onnx, on real val images."""
    x, _ = load_split("imagenette", "val", 112, limit_per_shard=8)
    xt, _ = load_split("imagenette", "train", 112, limit_per_shard=16)
    images = normalised(x)
    rebuilt = teacher_from_bundle("resnet18_w24", SHIPPED, 10, normalised(xt)).eval()
    with torch.no_grad():
        got = rebuilt(images).numpy()
    want = ort_logits(SHIPPED / "full.onnx", images)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def write_recipe(tmp_path: Path, weights: str, input_size: int = 112) -> Path:
    recipe = yaml.safe_load((REPO / "models/recipes/imagenette-resnet18-entropy-cpu.yaml").read_text())
    recipe["teacher"]["weights"] = weights
    recipe["input_size"] = input_size
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_checks_the_bundle_it_rebuilds(tmp_path):
    assert load_recipe(write_recipe(tmp_path, str(SHIPPED))).teacher.init == "bundle"
    with pytest.raises(RecipeError, match="teacher.weights: .* is not a bundle"):
        load_recipe(write_recipe(tmp_path, str(tmp_path / "missing")))
    with pytest.raises(RecipeError, match=r"teacher.weights: .* takes input \[3, 112, 112\]"):
        load_recipe(write_recipe(tmp_path, str(SHIPPED), input_size=224))
    with pytest.raises(RecipeError, match="teacher.weights: .* classifies"):
        load_recipe(write_recipe(tmp_path, str(REPO / "models" / "cifar10-resnet20-bottlefit"), input_size=32))
