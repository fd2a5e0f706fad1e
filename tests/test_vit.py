"""Vision Transformers in the zoo: stage API, published sizes, timm key map, ONNX parity on real
frames, single-tensor cut points at every block boundary, and distillation from a bundle."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (autouse: single-threaded torch)

from edgesplit.builder.export_common import check_against_torch, export_onnx, store_weights_fp16
from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.split import _real_images, candidate_cuts, split_at, trace, verify_split
from edgesplit.builder.zoo import INPUT_SIZE, create_model, load_pretrained
from edgesplit.builder.zoo.timm_keys import TimmKeyError, load_timm_state_dict, zoo_to_timm
from edgesplit.builder.zoo.vit import VIT_CONFIGS, VisionTransformer, ViTConfig
from edgesplit.engine import create_engine

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPE = ROOT / "models" / "recipes" / "cifar10-vit-cpu.yaml"
KD_BUNDLE = ROOT / "models" / "cifar10-resnet20-bottlefit"
# A DeiT-shaped model small enough to be quick: linear patch-8 embedding at 64 px, 2 blocks.
SMALL_DEIT = ViTConfig(64, 8, "linear", dim=48, depth=2, heads=3, qk_dim=16, v_dim=16, mlp_hidden=96)


@pytest.fixture(scope="module")
def cifar_frames():
    require_cifar()
    return _real_images("cifar10:test", 32, 16)


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224", 1000).eval()


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_stages_in_order_are_the_forward_pass(name):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    cfg = model.cfg
    assert model.stage_names == ("stem", *(f"block{i}" for i in range(cfg.depth)), "classifier")
    side = INPUT_SIZE[name]
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        h = x
        for s in model.stage_names:
            h = model.run_stage(s, h)
            if s != "classifier":  # tokens: class token + one per patch, all of width dim
                assert h.shape == (2, 1 + model.grid**2, cfg.dim), (s, tuple(h.shape))
        torch.testing.assert_close(h, model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="block0"):
        model.run_stage("block99x", h)


@pytest.mark.parametrize(
    "name, params, gmacs",
    # DeiT paper, table 1: 5.7 M / 22 M parameters, 1.3 / 4.6 GFLOPs (multiply-adds) at 224 px.
    [("deit_tiny_patch16_224", 5.7e6, 1.3), ("deit_small_patch16_224", 22e6, 4.6)],
)
def test_deit_sizes_match_the_paper(name, params, gmacs):
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, 1000).eval()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02, n
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, 224, 224))
    macs = fc.get_total_flops() / 2 / 1e9
    assert abs(macs - gmacs) / gmacs < 0.05, macs


def test_per_head_widths_are_separately_sliceable():
    # Pruning's contract: q/k/v are separate layers; per-block heads and widths may differ.
    cfg = ViTConfig(32, 4, "conv", dim=32, depth=2, heads=[2, 1], qk_dim=[8, 4], v_dim=[16, 8], mlp_hidden=[40, 24])
    model = VisionTransformer(cfg, 10)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    assert a0.q.weight.shape == (16, 32) and a0.k.weight.shape == (16, 32) and a0.v.weight.shape == (32, 32)
    assert a1.q.weight.shape == (4, 32) and a1.proj.weight.shape == (32, 8)
    assert model.blocks[1].mlp.fc1.weight.shape == (24, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="heads"):
        VisionTransformer(ViTConfig(32, 4, "conv", dim=32, depth=2, heads=[2]), 10)


def test_timm_key_map_round_trip(deit_tiny, tmp_path):
    sd = zoo_to_timm(deit_tiny.state_dict())
    names = set(sd)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight", "norm.bias"):
        assert key in names
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 192, 192)
    assert not any(".attn.q." in k or ".attn.v." in k for k in names)
    path = tmp_path / "deit_tiny_timm.pth"
    torch.save({"model": sd}, path)  # DeiT's own checkpoints wrap the state dict in "model"
    loaded = load_pretrained("deit_tiny_patch16_224", path, 1000).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deit_tiny(x), rtol=0, atol=0)


def test_timm_key_map_names_every_mismatch(deit_tiny):
    sd = zoo_to_timm(deit_tiny.state_dict())
    target = VisionTransformer(VIT_CONFIGS["deit_tiny_patch16_224"], 1000)
    missing = dict(sd)
    del missing["blocks.3.attn.qkv.weight"]
    with pytest.raises(TimmKeyError, match=r"missing keys .*blocks\.3\.attn\.qkv\.weight"):
        load_timm_state_dict(target, missing)
    extra = {**sd, "dist_token": torch.zeros(1, 1, 192), "head_dist.weight": torch.zeros(1000, 192)}
    with pytest.raises(TimmKeyError, match=r"unexpected keys: \['dist_token', 'head_dist.weight'\]"):
        load_timm_state_dict(target, extra)
    wrong = {**sd, "head.weight": torch.zeros(10, 192)}
    with pytest.raises(TimmKeyError, match=r"head\.weight: file \(10, 192\), model \(1000, 192\)"):
        load_timm_state_dict(target, wrong)
    with pytest.raises(TimmKeyError, match="conv"):
        load_timm_state_dict(create_model("vit_tiny_cifar", 10), sd)


def _export_and_check(model, x: np.ndarray, path: Path) -> dict:
    export_onnx(model, torch.from_numpy(x[:2]), path, "image", "logits")
    store_weights_fp16(path)  # as bundles store them
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Softmax"] == model.cfg.depth and ops["MatMul"] >= 2 * model.cfg.depth, ops
    return check_against_torch("full", create_engine(path, "ort"), model, x, classify=True)


@pytest.mark.parametrize("name", ["vit_tiny_cifar", "small_deit"])
def test_onnx_matches_torch_on_real_frames(name, cifar_frames, tmp_path):
    torch.manual_seed(0)
    if name == "small_deit":
        model = VisionTransformer(SMALL_DEIT, 10).eval()
        x = torch.nn.functional.interpolate(cifar_frames, size=64, mode="bilinear").numpy()
    else:
        model = create_model(name, 10).eval()
        x = cifar_frames.numpy()
    check = _export_and_check(model, x, tmp_path / f"{name}.onnx")
    # Same tolerance style as the CNN exports: relative to the output range (fp16-stored weights).
    assert check["max_rel_diff"] < 1e-2 and check["top1_agreement"] == 1.0, check


def test_deit_tiny_onnx_matches_torch_at_224(deit_tiny, tmp_path):
    x = _real_images("imagenette:val", 224, 4).numpy()
    check = _export_and_check(deit_tiny, x, tmp_path / "deit_tiny.onnx")
    assert check["max_rel_diff"] < 1e-2 and check["top1_agreement"] == 1.0, check


def test_every_block_boundary_is_a_single_tensor_cut(cifar_frames):
    model = create_model("vit_tiny_cifar", 10).eval()
    gm = trace(model, torch.zeros(2, 3, 32, 32))
    cuts = candidate_cuts(gm)
    per_block = {f"blocks.{i}": [c for c in cuts if c.module == f"blocks.{i}"] for i in range(model.cfg.depth)}
    for block, found in per_block.items():
        assert found, f"no cut point in {block}"
        assert found[-1].shape == (65, 128) and found[-1].bytes_per_frame == 65 * 128 * 4
    # Cut after block 2: head-then-tail is the whole model on real frames.
    head, tail = split_at(gm, None, per_block["blocks.2"][-1].name)
    check = verify_split(model, head, tail, cifar_frames)
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0, check


def test_distill_recipe_is_validated(tmp_path):
    data = yaml.safe_load(CPU_RECIPE.read_text())
    r = load_recipe(CPU_RECIPE)
    assert r.split is None and r.teacher.train.distill.bundle == "models/cifar10-resnet20-bottlefit"

    def refused(dotted_value: tuple[str, object], match: str) -> None:
        bad = json.loads(json.dumps(data))
        bad["teacher"]["train"]["distill"][dotted_value[0]] = dotted_value[1]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(RecipeError, match=match):
            load_recipe(path)

    refused(("bundle", "models/no-such-bundle"), r"teacher\.train\.distill\.bundle: 'models/no-such-bundle'")
    refused(("alpha", 1.5), r"teacher\.train\.distill\.alpha")
    refused(("temperature", 0), r"teacher\.train\.distill\.temperature")
    refused(("teacher", "x"), r"unknown key\(s\) \['teacher'\]")
    other_size = json.loads(json.dumps(data))
    other_size["input_size"] = 64  # accepted: the teacher bundle sees batches resized to its 32 px
    (tmp_path / "size.yaml").write_text(yaml.safe_dump(other_size))
    assert load_recipe(tmp_path / "size.yaml").input_size == 64


def test_distillation_teacher_resizes_batches_of_another_size():
    """A 32-px bundle distilling a 64-px student: the batch is resized (antialiased) to the bundle's
    input, so 2x-upsampled frames get the predictions of the frames themselves, up to resampling."""
    from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
    from edgesplit.builder.distill import OnnxTeacher

    require_cifar()
    x, y = load_split("cifar10", "test", 32, None, limit_per_shard=128)
    teacher = OnnxTeacher(KD_BUNDLE, threads=1)
    assert teacher.size == (32, 32)
    xb, _ = next(iter(DeviceLoader(x, y, 128, torch.device("cpu"), MEAN, STD)))
    big = torch.nn.functional.interpolate(xb, scale_factor=2, mode="bilinear", align_corners=False)
    down = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(teacher(big), teacher(down))
    # up- then down-sampling blurs a 32-px frame: most predictions survive it (chance is 0.1)
    same = (teacher(big).argmax(1) == teacher(xb).argmax(1)).float().mean().item()
    assert same >= 0.7, same


def test_distillation_step_lowers_the_loss_on_real_cifar(tmp_path):
    from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
    from edgesplit.builder.distill import OnnxTeacher, kd_loss
    from edgesplit.builder.train import train_classifier

    require_cifar()
    x, y = load_split("cifar10", "test", 32, None, limit_per_shard=64)
    r = load_recipe(CPU_RECIPE)
    cfg = {**vars(r.teacher.train), "epochs": 8, "warmup_epochs": 0.5, "lr": 3e-3, "eval_every": 1}
    loader = DeviceLoader(x, y, 32, torch.device("cpu"), MEAN, STD, shuffle=True, drop_last=True)
    teacher = OnnxTeacher(KD_BUNDLE, threads=1)
    fixed = DeviceLoader(x, y, 64, torch.device("cpu"), MEAN, STD)
    xb, yb = next(iter(fixed))
    d = r.teacher.train.distill
    torch.manual_seed(0)
    model = create_model("vit_tiny_cifar", 10)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(kd_loss(model(xb), teacher(xb), yb, d.alpha, d.temperature))

    before = loss_now()
    records: list[dict] = []
    train_classifier(model, cfg, loader, torch.device("cpu"), tmp_path, records.append, None, fixed)
    after = loss_now()
    assert after < 0.95 * before, (before, after)
    assert records[0]["event"] == "distill_teacher" and records[0]["accuracy"] > 0.6  # the shipped ResNet-20
    assert [rec["epoch"] for rec in records[1:]] == list(range(1, 9))
    assert (tmp_path / "teacher.ckpt").is_file()  # resumable like every other stage


def test_teacher_only_recipe_runs_end_to_end_and_resumes(tmp_path):
    # The CPU ViT recipe itself on a tiny real slice: trains the ViT (distilled from the bundle),
    # leaves teacher.pt + results.json, and a rerun recomputes nothing.
    from edgesplit.builder.pipeline import run_recipe

    require_cifar()
    r = load_recipe(CPU_RECIPE)
    r.teacher.train.epochs, r.teacher.train.batch, r.teacher.train.eval_every = 1, 8, 1
    results = run_recipe(r, tmp_path / "run", "cpu", limit_per_shard=8, workers=1)
    assert (tmp_path / "run" / "teacher.pt").is_file() and 0.0 <= results["teacher_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e.get("event") for e in events if "event" in e] == ["data", "distill_teacher", "teacher"]
    assert run_recipe(r, tmp_path / "run", "cpu", limit_per_shard=8, workers=1) == results
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "finished_already"


def test_random_erasing_blanks_one_rectangle_in_about_half_the_frames():
    from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split

    require_cifar()
    x, y = load_split("cifar10", "test", 32, None, limit_per_shard=200)
    loader = DeviceLoader(x, y, 200, torch.device("cpu"), MEAN, STD, augment="crop_flip_erase", seed=1)
    xb, _ = next(iter(loader))
    # A normalised real pixel is never exactly 0 in all three channels (the mean is not a pixel
    # value), so those pixels are the erased rectangle.
    erased = (xb == 0).all(dim=1).flatten(1).sum(1)
    frac = (erased > 0).float().mean().item()
    assert 0.35 < frac < 0.65, frac
    areas = erased[erased > 0].float() / (32 * 32)
    assert areas.min() >= 0.01 and areas.max() <= 0.3, (areas.min(), areas.max())
