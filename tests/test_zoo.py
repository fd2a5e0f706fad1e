"""Model zoo: every registered architecture builds and runs stage by stage; the shared pretrained
ResNet-56 loads strictly and classifies real CIFAR-10 test JPEGs as well as its README says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from build_fixtures import one_torch_thread  # noqa: F401  (autouse: single-threaded torch here)

from edgesplit.builder.zoo import INPUT_SIZE, MODELS, create_model, load_pretrained, load_state_dict_file
from edgesplit.data.sources import data_root, iter_tar_shards, take
from edgesplit.data.transforms import preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEACHER_REL = "teachers/resnet56-4bfd9763.th"


def teacher_path():
    p = data_root() / TEACHER_REL
    if not p.is_file():
        pytest.fail(f"shared ResNet-56 teacher not found at {p} (set EDGESPLIT_DATA)")
    return p


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shapes_and_stages(name):
    torch.manual_seed(0)
    num_classes = 7  # not the default of any family: the head must follow the argument
    model = create_model(name, num_classes).eval()
    side = INPUT_SIZE[name]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, num_classes)
        assert torch.isfinite(out).all()
        names = list(model.stage_names)
        assert names[0] == "stem" and names[-1] == "classifier" and len(set(names)) == len(names)
        h, sides = x, []
        for s in names:
            h = model.run_stage(s, h)
            if s != "classifier":
                # CNN stages carry feature maps (4-d); ViT stages carry token sequences (3-d).
                assert h.dim() in (3, 4) and h.shape[0] == 2, f"{name}.{s} output {tuple(h.shape)}"
                sides.append(h.shape[-1])
        # Each stage keeps or reduces the spatial side: a split point never upsamples.
        assert all(a >= b for a, b in zip(sides, sides[1:])), sides
        torch.testing.assert_close(h, out, rtol=1e-5, atol=1e-5)
        # The two samples of the batch are computed independently in eval mode.
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-4)


def test_input_size_covers_every_model():
    assert set(INPUT_SIZE) == set(MODELS)
    assert all(INPUT_SIZE[n] == 32 for n in MODELS if n.endswith("_cifar"))


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError) as ei:
        create_model("resnet57_cifar", 10)
    msg = str(ei.value)
    assert "resnet57_cifar" in msg
    for known in ("resnet20_cifar", "resnet56_cifar", "resnet18", "mobilenetv2"):
        assert known in msg


def test_cifar_resnet_depth_must_be_6n_plus_2():
    from edgesplit.builder.zoo.resnet_cifar import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_teacher_checkpoint_keys_are_unprefixed():
    sd = load_state_dict_file(teacher_path())
    assert sd and not any(k.startswith("module.") for k in sd)
    assert "conv1.weight" in sd and "linear.weight" in sd
    assert tuple(sd["linear.weight"].shape) == (10, 64)
    assert all(t.device.type == "cpu" for t in sd.values())


def test_teacher_loads_strictly_and_matches_its_weights():
    path = teacher_path()
    model = load_pretrained("resnet56_cifar", path, 10)
    sd = load_state_dict_file(path)
    msd = model.state_dict()
    # Every checkpoint tensor landed in the model unchanged; only BN counters were filled in.
    assert set(msd) - set(sd) == {k for k in msd if k.endswith("num_batches_tracked")}
    for k, v in sd.items():
        assert torch.equal(msd[k], v.float()), k


def test_teacher_into_wrong_arch_is_refused():
    path = teacher_path()
    with pytest.raises(ValueError) as ei:
        load_pretrained("resnet20_cifar", path, 10)
    msg = str(ei.value)
    assert "resnet20_cifar" in msg and "layer1.3" in msg  # the unexpected keys are listed


def test_teacher_with_wrong_class_count_is_refused():
    with pytest.raises(ValueError, match="linear"):
        load_pretrained("resnet56_cifar", teacher_path(), 100)


def test_teacher_accuracy_on_real_cifar10_slice():
    path = teacher_path()
    shard = data_root() / "cifar10-jpeg" / "test-00000.tar.gz"
    if not shard.is_file():
        pytest.fail(f"CIFAR-10 test shard not found at {shard} (set EDGESPLIT_DATA)")
    model = load_pretrained("resnet56_cifar", path, 10).eval()
    spec = {"shape": [3, 32, 32], "resize": 32, "mean": MEAN, "std": STD}
    samples = list(take(iter_tar_shards([shard]), 500))
    assert len(samples) == 500
    x = torch.from_numpy(np.stack([preprocess(s.data, spec) for s in samples]))
    y = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    acc = float((pred == y).float().mean())
    # README: about 83% on the JPEG test shard (93.4% on the original PNGs).
    assert 0.70 < acc < 0.95, acc
    # A randomly initialised network of the same arch is at chance on the same frames.
    torch.manual_seed(0)
    with torch.no_grad():
        rand_acc = float((create_model("resnet56_cifar", 10).eval()(x[:250]).argmax(1) == y[:250]).float().mean())
    assert rand_acc < 0.3
