"""The ED-ViT family's pieces (edgesplit/families/edvit): class partition, class-wise pruning,
budget sizing, the fusion head with a sub-model dropped, and the manifest checks of BUNDLE.md §7.1.

Real components throughout: the zoo's ViT, real CIFAR-10 test frames, a tiny recipe trained in
process on a slice of the real shards (tests/recipes/tiny-edvit.yaml). The end-to-end path (train,
export, inspect, fused accuracy in ONNX Runtime) is tests/test_families.py's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.zoo.vit import VIT_CONFIGS, VisionTransformer
from edgesplit.bundle import BundleError, validate_manifest
from edgesplit.families.edvit.model import Keep, SubModel, prune_vit
from edgesplit.families.edvit.partition import confusion_partition, contiguous_partition
from edgesplit.families.edvit.prune import choose_keep, taylor_importance
from edgesplit.families.edvit.sizing import BudgetError, size_for_budget, vit_cost
from edgesplit.families.edvit.train import random_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).resolve().parent / "recipes" / "tiny-edvit.yaml"


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Real CIFAR-10 test frames, preprocessed as a bundle does."""
    from edgesplit.builder.export_common import eval_images, input_spec_for

    require_cifar()
    x, _ = eval_images("cifar10", "test", input_spec_for(32), 8)
    return torch.from_numpy(x)


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VIT_CONFIGS["vit_tiny_cifar"], 10).eval()


# -- partition -----------------------------------------------------------------------------------


def blocky_confusion(groups: list[list[int]], k: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.uniform(0, 0.01, (k, k))
    for g in groups:
        for i in g:
            for j in g:
                c[i, j] += 0.1
    return c


@pytest.mark.parametrize("n", [2, 3, 4])
def test_partition_covers_every_class_once_balanced_and_deterministic(n):
    conf = np.random.default_rng(n).uniform(size=(10, 10))
    for parts in (confusion_partition(conf, n, seed=3), contiguous_partition(10, n)):
        flat = sorted(c for p in parts for c in p)
        assert flat == list(range(10)) and len(parts) == n
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert confusion_partition(conf, n, seed=3) == confusion_partition(conf.copy(), n, seed=3)


def test_confusion_partition_groups_the_classes_the_model_confuses():
    truth = [[0, 3, 5, 7, 9], [1, 2, 4, 6, 8]]
    assert confusion_partition(blocky_confusion(truth), 2) == truth
    truth3 = [[0, 1, 8, 9], [2, 6, 7], [3, 4, 5]]  # CIFAR-like: vehicles, some animals, the rest
    assert confusion_partition(blocky_confusion(truth3), 3) == truth3
    with pytest.raises(ValueError, match="cannot split 10 classes into 11"):
        confusion_partition(np.eye(10), 11)


# -- pruning -------------------------------------------------------------------------------------


def zeroed_copy(vit: VisionTransformer, keep: Keep) -> VisionTransformer:
    """The unpruned model with the pruned heads and neurons zeroed (all channels kept)."""
    z = copy.deepcopy(vit)
    with torch.no_grad():
        for b, blk in enumerate(z.blocks):
            a = blk.attn
            for h in range(a.heads):
                if h not in keep.heads[b]:
                    for lin, w in ((a.q, a.qk_dim), (a.k, a.qk_dim), (a.v, a.v_dim)):
                        lin.weight[h * w : (h + 1) * w] = 0
                        lin.bias[h * w : (h + 1) * w] = 0
                    a.proj.weight[:, h * a.v_dim : (h + 1) * a.v_dim] = 0
            for j in range(blk.mlp.fc1.out_features):
                if j not in keep.neurons[b]:
                    blk.mlp.fc1.weight[j] = 0
                    blk.mlp.fc1.bias[j] = 0
                    blk.mlp.fc2.weight[:, j] = 0
    return z


def test_pruned_model_equals_the_unpruned_one_with_the_pruned_parts_zeroed(vit, frames):
    classes = [1, 4, 7]
    scores = taylor_importance(vit, frames, torch.tensor([1, 4, 7, 1, 4, 7, 1, 4]), classes)
    width = {"dim": vit.cfg.dim, "heads": [2] * vit.cfg.depth, "mlp_hidden": [96] * vit.cfg.depth}
    keep = choose_keep(scores, width, prune_embedding=False)
    ch, hs, ns = scores
    for b in range(vit.cfg.depth):  # the kept heads and neurons are the highest-scoring ones
        assert len(keep.heads[b]) == 2 and min(hs[b][keep.heads[b]]) >= max(np.delete(hs[b].numpy(), keep.heads[b]))
        assert len(keep.neurons[b]) == 96
        assert min(ns[b][keep.neurons[b]]) >= max(np.delete(ns[b].numpy(), keep.neurons[b]))
    sub = SubModel(prune_vit(vit, keep, classes)).eval()
    assert sub.vit.cfg.heads == [2] * vit.cfg.depth and sub.vit.cfg.mlp_hidden == [96] * vit.cfg.depth
    z = zeroed_copy(vit, keep)
    with torch.no_grad():
        feats, logits = sub(frames)
        t = z.embed(frames)
        for blk in z.blocks:
            t = blk(t)
        ref_feats = z.norm(t)[:, 0]
        ref_logits = z.head(ref_feats)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, :3], ref_logits[:, classes], rtol=1e-5, atol=1e-5)
    other = [c for c in range(10) if c not in classes]
    torch.testing.assert_close(logits[:, 3], ref_logits[:, other].mean(1), rtol=1e-5, atol=1e-5)
    # and something was removed: the unpruned model answers differently
    assert not torch.allclose(vit(frames)[:, classes], logits[:, :3], atol=1e-4)


def test_embedding_channels_are_pruned_by_index(vit, frames):
    scores = taylor_importance(vit, frames, torch.zeros(8, dtype=torch.long), [0, 1])
    width = {"dim": 40, "heads": [1] * 6, "mlp_hidden": [80] * 6}
    keep = choose_keep(scores, width)
    sub = prune_vit(vit, keep, [0, 1])
    assert sub.cfg.dim == 40 and keep.channels == sorted(keep.channels)
    ch = torch.tensor(keep.channels)
    torch.testing.assert_close(sub.pos_embed, vit.pos_embed[..., ch])
    torch.testing.assert_close(sub.blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight[ch][:, keep.neurons[3]])
    assert torch.isfinite(SubModel(sub)(frames)[1]).all()
    assert sum(p.numel() for p in sub.parameters()) == vit_cost(sub.cfg, 3).params  # cost = the real count


# -- sizing --------------------------------------------------------------------------------------


def test_budget_sizing_and_the_budget_error():
    r = load_recipe(TINY)
    cfg, full = VIT_CONFIGS["vit_tiny_cifar"], vit_cost(VIT_CONFIGS["vit_tiny_cifar"], 10)
    size = size_for_budget(cfg, r.split, 10)
    assert size.cost.memory_mb <= r.split.budget.memory_mb and size.cost.latency_ms <= r.split.budget.latency_ms
    # the tiny recipe's setting: every sub-model over 5x smaller than the teacher in params and MACs
    assert full.params / size.cost.params >= 5 and full.macs / size.cost.macs >= 5
    r.split.budget.memory_mb = 0.01
    with pytest.raises(BudgetError) as ei:
        size_for_budget(cfg, r.split, 10)
    msg = str(ei.value)
    assert "raspberry-pi-4" in msg and "memory_mb=0.01" in msg and "smallest sub-model reachable" in msg


def test_recipe_checks(tmp_path):
    import yaml

    data = yaml.safe_load(TINY.read_text())
    for split, match in (
        ({"budget": {}}, "split.budget: give memory_mb"),
        ({"submodels": 11}, r"split.submodels: must be in \[2, 10\]"),
        ({"partition": "random"}, "split.partition: must be one of"),
    ):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**data, "split": {**data["split"], **split}}))
        with pytest.raises(RecipeError, match=match):
            load_recipe(tmp_path / "r.yaml")


# -- the trained ensemble: fusion with a sub-model dropped -----------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from edgesplit.builder.pipeline import load_student, run_recipe

    require_cifar()
    run_dir = tmp_path_factory.mktemp("edvit") / "runs" / "tiny-edvit"
    results = run_recipe(load_recipe(TINY), run_dir, device="cpu", limit_per_shard=8, workers=1)
    model, state = load_student(run_dir / "student.pt")
    return model, state, results


def test_fusion_with_one_submodel_dropped_still_answers(trained, frames):
    ens, state, results = trained
    n = len(ens.submodels)
    assert n == 2 and sorted(c for p in ens.partition for c in p) == list(range(10))
    with torch.no_grad():
        feats = ens.features(frames)
        for drop in range(n):
            mask = torch.ones(len(frames), n)
            mask[:, drop] = 0
            out = ens(frames, mask)
            assert out.shape == (len(frames), 10) and torch.isfinite(out).all()
            # a dropped sub-model's features do not reach the answer: change them, same logits
            from edgesplit.families.edvit.model import mask_features

            noisy = [f + 100.0 * (i == drop) for i, f in enumerate(feats)]
            torch.testing.assert_close(ens.fusion(mask_features(noisy, mask), mask), out)
    acc = results["edvit"]
    assert set(acc["missing_one"]) == {"0", "1"} and 0 <= acc["missing_mean"] <= 1
    placement = results["placement"]
    assert placement["makespan_ms"] >= placement["optimum_ms"] > 0 and len(placement["assignment"]) == n
    teacher, subs = results["teacher_cost"], results["submodel_costs"]
    assert all(teacher["params"] >= 5 * s["params"] and teacher["macs"] >= 5 * s["macs"] for s in subs)
    for sub, cost in zip(ens.submodels, subs):
        assert sum(p.numel() for p in sub.parameters()) == cost["params"]


def test_fusion_features_are_each_image_and_its_mirror(trained, vit):
    """The fusion head's training set: every image, then every image mirrored, labels repeated."""
    from edgesplit.builder.data import load_split
    from edgesplit.families.edvit.train import features_of

    ens = trained[0]
    x, y = load_split("cifar10", "train", 32, limit_per_shard=4)  # 20 real training images
    feats, t_logits, labels = features_of(ens, vit.eval(), x, y, torch.device("cpu"))
    n = len(y)
    assert feats.shape[0] == t_logits.shape[0] == 2 * n and labels.tolist() == [*y.tolist(), *y.tolist()]
    from edgesplit.builder.data import MEAN, STD, DeviceLoader

    (xb, _), *_ = list(DeviceLoader(x, y, 250, torch.device("cpu"), MEAN, STD))
    with torch.no_grad():
        plain = torch.cat(ens.features(xb), 1)
        mirrored = torch.cat(ens.features(xb.flip(3)), 1)
    torch.testing.assert_close(feats[:n], plain)
    torch.testing.assert_close(feats[n:], mirrored)
    assert not torch.allclose(plain, mirrored)


def test_random_mask_never_drops_every_submodel():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 4):
        m = random_mask(n, 500, 0.9, gen)
        assert m.sum(1).min() >= 1 and (m.sum(1) < n).float().mean() > 0.5


# -- manifest checks (BUNDLE.md §7.1) --------------------------------------------------------------


def edvit_manifest() -> dict:
    m = json.loads((ROOT / "models" / "cifar10-resnet20-bottlefit" / "manifest.json").read_text())
    del m["wire"]
    h = {"sha256": "0" * 64}
    m["family"] = "edvit"
    m["files"] = {r: {"path": f"{r}.onnx", **h} for r in ("full", "fusion", "submodel.0", "submodel.1")}
    m["modes"] = [{"id": 0, "features_dtype": "float32", "bytes_per_frame": 512, "accuracy": 0.8}]
    m["default_mode"] = 0

    def sub(i, classes):
        return {
            "id": i,
            "role": f"submodel.{i}",
            "classes": classes,
            "features": {"name": "features", "dim": 64},
            "logits": {"name": "logits", "dim": len(classes) + 1},
            "params": 1000,
            "macs": 10000,
            "memory_mb": 1.5,
        }

    m["edvit"] = {
        "submodels": [sub(0, [0, 1, 2, 3, 4]), sub(1, [5, 6, 7, 8, 9])],
        "fusion": {"role": "fusion", "features": "features", "mask": "mask", "output": "logits"},
        "partition": {"method": "confusion", "seed": 0},
        "accuracy": {"full": 0.8, "fused": 0.79, "missing_one": {"0": 0.4, "1": 0.4}, "missing_mean": 0.4},
    }
    return m


def _edit(m: dict, what: str) -> None:
    subs, files = m["edvit"]["submodels"], m["files"]
    if what == "uncovered":
        subs[1]["classes"].remove(9)
        subs[1]["logits"]["dim"] = 5
    elif what == "twice":
        subs[1]["classes"].append(3)
        subs[1]["logits"]["dim"] = 7
    elif what == "ids":
        subs[1]["id"] = 2
    elif what == "file":
        del files["submodel.1"]
    elif what == "stray":
        files["submodel.5"] = files["full"]
    elif what == "wire":
        m["wire"] = {"name": "z", "shape": [1, 1, 1]}
    elif what == "dtype":
        m["modes"][0]["features_dtype"] = "int8"
    elif what == "many":
        subs[:] = [dict(subs[0], id=i, role=f"submodel.{i}", classes=[i]) for i in range(17)]
    elif what == "head":
        files["head"] = files["full"]


@pytest.mark.parametrize(
    "what, match",
    [
        ("uncovered", r"class 9 \('truck'\) is covered by no sub-model"),
        ("twice", r"class 3 \('cat'\) is covered by sub-models 0 and 1"),
        ("ids", r"'edvit.submodels\[1\].id' must be 1"),
        ("file", "'files' has no 'submodel.1' entry"),
        ("stray", "'files.submodel.5' names no sub-model"),
        ("wire", "'wire' must be absent"),
        ("dtype", "features_dtype' must be one of"),
        ("many", "must list 1 to 16 sub-models, got 17"),
        ("head", "unknown file role 'head' for family edvit"),
    ],
)
def test_edvit_manifest_is_checked(what, match):
    validate_manifest(edvit_manifest())
    m = edvit_manifest()
    _edit(m, what)
    with pytest.raises(BundleError, match=match):
        validate_manifest(m)


def test_joint_stage1_trains_each_submodel_exactly_as_alone(vit, frames, tmp_path):
    """finetune_submodels shares the teacher's forward pass between sub-models; since they share no
    parameter, the summed loss must leave each with the weights it gets trained alone on the same
    batches (Adam, warmup, cosine: all per parameter)."""
    from edgesplit.families.edvit.train import finetune_submodels

    groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
    width = {"dim": 40, "heads": [1] * 6, "mlp_hidden": [80] * 6}
    labels = torch.arange(8) % 10
    # importance from images labelled inside each subset, as the recipe samples them
    keeps = [
        choose_keep(taylor_importance(vit, frames, torch.tensor([g[i % len(g)] for i in range(8)]), g), width, False)
        for g in groups
    ]
    batches = [(frames, labels), (frames.flip(3), labels), (frames * 0.5, labels)]
    cfg = {"epochs": 2, "lr": 3e-3, "optimizer": "adam", "weight_decay": 0.05, "warmup_epochs": 0.5, "alpha": 0.7}
    cfg["temperature"] = 2.0

    def fresh() -> list[SubModel]:
        return [SubModel(prune_vit(vit, k, g)) for k, g in zip(keeps, groups)]

    joint = fresh()
    finetune_submodels(joint, vit, groups, cfg, batches, torch.device("cpu"), tmp_path, lambda r: None, "j")
    before = fresh()
    for i, g in enumerate(groups):
        alone = fresh()[i]
        finetune_submodels([alone], vit, [g], cfg, batches, torch.device("cpu"), tmp_path, lambda r: None, f"a{i}")
        for (name, a), b in zip(alone.state_dict().items(), joint[i].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert any(not torch.equal(a, c) for a, c in zip(alone.state_dict().values(), before[i].state_dict().values()))
