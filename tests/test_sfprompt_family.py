"""SFPrompt (family ``sfprompt``): the head / body / tail cut of a zoo ViT, the prompts, the body
skipped for EL2N and the local-loss update, the split step's gradients, the federation helpers and
the recipe schema. Real Imagenette frames downscaled to 32 px (the federated task), small slices;
the ViT is built here (random, or trained a few steps), never read from runs/.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from build_fixtures import one_torch_thread  # noqa: F401  (pytest fixture by name)

from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.zoo import create_model
from edgesplit.families.sfprompt.el2n import el2n_scores, keep_count, prune
from edgesplit.families.sfprompt.federation import check_state, dirichlet_partition, fedavg, sample_clients
from edgesplit.families.sfprompt.model import SFPromptModel, build_body
from edgesplit.families.sfprompt.train import LocalBody, client_round, local_loss_update, split_step

RECIPE = "tests/recipes/tiny-sfprompt.yaml"


@pytest.fixture(scope="module")
def frames():
    """64 real Imagenette validation frames at 32 px (16 per shard), uint8 NHWC, and labels."""
    from edgesplit.data.sources import data_root

    if not (data_root() / "imagenette-224" / "val-00000.tar.gz").is_file():
        pytest.fail(f"shared Imagenette shards not found under {data_root()} (set EDGESPLIT_DATA)")
    return load_split("imagenette", "val", 32, limit_per_shard=16)


def normalised(x: np.ndarray) -> torch.Tensor:
    return torch.cat([b for b, _ in DeviceLoader(x, np.zeros(len(x), np.int64), 256, torch.device("cpu"), MEAN, STD)])


def vit(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_tiny_cifar", 10).eval()


def test_cut_without_prompts_is_the_vit(frames):
    v = vit()
    x = normalised(frames[0][:8])
    with torch.no_grad():
        want = v(x)
        m = SFPromptModel(copy.deepcopy(v), 2, 4, prompts=0, reset_classifier=False).eval()
        assert torch.allclose(m(x), want, atol=1e-5)
        assert m.tokens == 65 and m.head(x).shape == (8, 65, 128)


def test_prompts_follow_the_class_token_and_train_alone_in_the_head(frames):
    m = SFPromptModel(vit(), 0, 3, prompts=5, prompt_std=0.5)
    x = normalised(frames[0][:4])
    with torch.no_grad():
        t = m.head(x)
        plain = SFPromptModel(vit(), 0, 3, prompts=0).head(x)
    assert t.shape == (4, 1 + 5 + 64, 128)
    assert torch.equal(t[:, 1:6], m.head.prompts.expand(4, -1, -1))  # no position embedding on prompts
    assert torch.equal(t[:, :1], plain[:, :1]) and torch.equal(t[:, 6:], plain[:, 1:])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("tail.")} == {"head.prompts"}
    assert {n for n, _ in m.tail.named_parameters()} == {n[5:] for n in trainable if n.startswith("tail.")}
    assert torch.count_nonzero(m.tail.classifier.weight) == 0  # reset for the new task


def test_local_logits_skip_the_body_exactly(frames):
    """head -> tail alone is the ViT with the body's blocks deleted."""
    v = vit(1)
    x = normalised(frames[0][:6])
    m = SFPromptModel(copy.deepcopy(v), 1, 4, prompts=0, reset_classifier=False).eval()
    short = copy.deepcopy(v)
    del short.blocks[1:4]
    with torch.no_grad():
        assert torch.allclose(m.local_logits(x), short(x), atol=1e-5)
        assert not torch.allclose(m.local_logits(x), m(x), atol=1e-3)  # the body does matter


def test_el2n_scores_and_pruning(frames):
    x, y = frames[0][:32], frames[1][:32]
    m = SFPromptModel(vit(2), 2, 4, prompts=4, reset_classifier=False)
    xs, ys = normalised(x), torch.from_numpy(y)
    s = el2n_scores(m, xs, ys, batch=7)
    with torch.no_grad():
        want = (F.softmax(m.local_logits(xs), -1) - F.one_hot(ys, 10)).norm(dim=-1)
    assert torch.allclose(s, want, atol=1e-6)
    keep = prune(s, 0.25)
    assert len(keep) == keep_count(32, 0.25) == 8
    assert s[keep].min() >= s[[i for i in range(32) if i not in set(keep.tolist())]].max()
    assert keep_count(3, 0.01) == 1 and keep_count(0, 0.5) == 0 and len(prune(s, 1.0)) == 32
    with pytest.raises(ValueError):
        keep_count(10, 0.0)


def test_per_class_pruning_keeps_every_class_at_the_lightest_cut(frames):
    """With no block on the client the local path sees one class token for every image: scores
    depend on the label only, plain pruning drops whole classes, per-class pruning keeps each."""
    x, y = frames[0][:40], frames[1][:40]
    m = SFPromptModel(vit(5), 0, 6, prompts=4, reset_classifier=False)
    xs, ys = normalised(x), torch.from_numpy(y)
    s = el2n_scores(m, xs, ys)
    for c in set(y.tolist()):  # one score per class
        assert len({round(float(v), 6) for v in s[ys == c]}) == 1
    plain = prune(s, 0.5)
    assert len(set(y[plain.numpy()].tolist())) < len(set(y.tolist()))
    per = prune(s, 0.5, ys, seed=1)
    for c in set(y.tolist()):
        assert (y[per.numpy()] == c).sum() == keep_count(int((y == c).sum()), 0.5)
    again, other = prune(s, 0.5, ys, seed=1), prune(s, 0.5, ys, seed=2)
    assert torch.equal(per, again) and not torch.equal(per, other)  # a fresh stratified draw per seed
    # with real per-image scores, each class keeps its highest ones
    scores = torch.rand(40, generator=torch.Generator().manual_seed(0))
    keep = set(prune(scores, 0.5, ys).tolist())
    for c in set(y.tolist()):
        members = [i for i in range(40) if y[i] == c]
        kept = [i for i in members if i in keep]
        dropped = [i for i in members if i not in keep]
        assert not dropped or min(scores[kept]) >= max(scores[dropped])
    with pytest.raises(ValueError, match="labels"):
        prune(scores, 0.5, ys[:10])


def test_prompts_can_have_their_own_learning_rate():
    from edgesplit.families.sfprompt.train import client_optimizer

    m = SFPromptModel(vit(6), 1, 4, prompts=4)
    stage = {"lr": 1e-3, "optimizer": "adam", "weight_decay": 0.05}
    (one,) = client_optimizer(m, stage).param_groups  # as before: one group, the stage's step
    assert one["lr"] == 1e-3 and len(one["params"]) == len(m.client_parameters())
    rest, prompts = client_optimizer(m, stage, prompt_lr=1e-2).param_groups
    assert prompts["params"] == [m.head.prompts] and prompts["lr"] == 1e-2 and prompts["weight_decay"] == 0.0
    assert rest["lr"] == 1e-3 and rest["weight_decay"] == 0.05
    assert len(rest["params"]) + 1 == len(m.client_parameters())
    (only,) = client_optimizer(SFPromptModel(vit(6), 1, 4, prompts=0), stage, prompt_lr=1e-2).param_groups
    assert only["lr"] == 1e-3  # SplitFed's model has no prompts: nothing to treat apart


def test_local_loss_update_trains_tail_and_prompts_only(frames):
    x, y = frames[0][:16], frames[1][:16]
    m = SFPromptModel(vit(3), 2, 4, prompts=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    from edgesplit.builder.train import make_optimizer

    loader = DeviceLoader(x, y, 16, torch.device("cpu"), MEAN, STD, None, shuffle=True, seed=0)
    losses = local_loss_update(m, make_optimizer(m.client_parameters(), {"lr": 3e-3, "optimizer": "adam"}), loader, 30)
    assert losses[-1] < 0.5 * losses[0], losses  # 16 frames: the tail can fit them
    after = m.state_dict()
    for k, v in after.items():
        changed = not torch.equal(v, before[k])
        if k.startswith("tail.") and not k.endswith("num_batches_tracked"):
            continue
        assert changed == (k == "head.prompts"), k


def test_split_step_gives_the_gradients_of_the_whole_model(frames):
    """The split step (detach at both cuts, gradients handed across) computes exactly what
    backprop through head -> body -> tail computes, prompts included."""
    x, y = normalised(frames[0][:8]), torch.from_numpy(frames[1][:8])
    m = SFPromptModel(vit(4), 1, 4, prompts=3, reset_classifier=False)  # a zero classifier passes no gradient back
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(m.client_parameters(), lr=0.0)  # lr 0: compare gradients, keep weights
    loss = split_step(m, opt, x, y, LocalBody(m.body), step=1)
    ref.train()
    want = F.cross_entropy(ref(x), y)
    want.backward()
    assert abs(loss - float(want.detach())) < 1e-5
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), n
    assert m.head.prompts.grad.abs().sum() > 0


def test_client_round_keeps_gamma_and_is_seeded(frames):
    x, y = frames
    st = {"epochs": 1, "lr": 1e-3, "batch": 8, "optimizer": "adam", "weight_decay": 0.0}
    out = []
    for _ in range(2):
        m = SFPromptModel(vit(5), 1, 3, prompts=2)
        r = client_round(
            m, x[:20], y[:20], LocalBody(m.body), st, st, gamma=0.5, local_loss=True, augment="crop_flip", seed=7
        )
        out.append((r, m.client_state()))
    assert out[0][0].kept == 10 and out[0][0].samples == 20 and out[0][0].split_steps == 2
    assert out[0][0] == out[1][0]
    assert all(torch.equal(v, out[1][1][k]) for k, v in out[0][1].items())


def test_body_package_blocks_match():
    m = SFPromptModel(vit(6), 2, 5, prompts=1)
    body = build_body({**vars(m.cfg), "stem_widths": list(m.cfg.stem_widths)}, 2, 5)
    body.load_state_dict(m.body.state_dict(), strict=True)
    t = torch.randn(2, m.tokens, 128)
    with torch.no_grad():
        assert torch.equal(body(t), m.body(t))
    assert not any(p.requires_grad for p in body.parameters())


def test_dirichlet_partition_is_seeded_complete_and_skewed():
    labels = np.repeat(np.arange(10), 50)
    a = dirichlet_partition(labels, 5, 0.5, seed=3)
    b = dirichlet_partition(labels, 5, 0.5, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(500))
    # label skew: with alpha 0.5 some client's label histogram is far from uniform
    hist = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in a])
    assert hist.max() > 0.3
    iid = dirichlet_partition(labels, 5, 1000.0, seed=3)
    assert np.array([np.bincount(labels[p], minlength=10) / len(p) for p in iid]).max() < 0.2
    assert sample_clients(10, 4, 2, 0) == sample_clients(10, 4, 2, 0) and len(set(sample_clients(10, 4, 2, 0))) == 4


def test_fedavg_weights_and_refusals():
    s1 = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    s2 = {"a": 3 * np.ones((2, 2), np.float32), "b": np.ones(3, np.float32)}
    avg = fedavg([s1, s2], [1, 3])
    assert np.allclose(avg["a"], 2.5) and np.allclose(avg["b"], 0.75)
    with pytest.raises(ValueError, match="NaN"):
        fedavg([s1, {"a": np.full((2, 2), np.nan, np.float32), "b": s2["b"]}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        check_state({"a": np.ones(4, np.float32), "b": s1["b"]}, s1)
    with pytest.raises(ValueError, match="unknown"):
        check_state({**s1, "c": s1["b"]}, s1)


def test_recipe_schema(tmp_path):
    r = load_recipe(RECIPE)
    assert (r.split.head_blocks, r.split.body_end, r.split.prompts) == (1, 4, 4)
    data = yaml.safe_load(open(RECIPE))
    bad = [
        ({"promptz": 3}, r"unknown key\(s\) \['promptz'\]"),
        ({"body_end": 1}, "split.body_end"),
        ({"head_blocks": 6}, "split.head_blocks"),
        ({"gamma": 0.0}, "split.gamma"),
        ({"clients_per_round": 4}, "split.clients_per_round"),
        ({"grad_bits": 4}, "split.grad_bits"),
        ({"prompts": 1.5}, "split.prompts"),
    ]
    for change, match in bad:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**data, "split": {**data["split"], **change}}))
        with pytest.raises(RecipeError, match=match):
            load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**data, "teacher": {**data["teacher"], "arch": "resnet20_cifar"}}))
    with pytest.raises(RecipeError, match="teacher.arch"):
        load_recipe(tmp_path / "r.yaml")


def test_cli_trains_federated_and_exports_the_body_package(tmp_path):
    """``edgesplit train`` on the tiny recipe (teacher trained one epoch on a CIFAR slice, then
    two simulated federated rounds), then ``edgesplit export`` writes the body package."""
    import hashlib
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from edgesplit.builder.pipeline import load_student

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "edgesplit", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    cli("train", str(root / RECIPE), "--device", "cpu", "--workers", "1", "--limit-per-shard", "8")
    run = tmp_path / "runs" / "tiny-sfprompt"
    res = json.loads((run / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2] and res["family"] == "sfprompt"
    parts = json.loads((run / "partition.json").read_text())
    assert sorted(i for p in parts for i in p) == list(range(40)) and len(parts) == 3
    for r in res["rounds"]:
        assert len(r["clients"]) == 2 and all(c["kept"] == -(-c["samples"] // 2) for c in r["clients"])
    model, state = load_student(run / "student.pt")
    ev = load_split("cifar10", "test", 32, limit_per_shard=8)
    from edgesplit.families.sfprompt.train import accuracy

    assert accuracy(model, *ev) == res["accuracy"]
    # export: the U-shaped bundle at --out, the body package for split training beside it (<out>-body)
    out = json.loads(cli("export", str(run / "student.pt"), "--out", str(tmp_path / "bundle")).stdout)
    bundle_manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert out["hash"] == hashlib.sha256((tmp_path / "bundle" / "manifest.json").read_bytes()).hexdigest()
    assert bundle_manifest["family"] == "sfprompt"
    pkg = tmp_path / "bundle-body"
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["blocks"] == [1, 4] and m["tokens"] == [1 + 4 + 64, 128] and m["checks"]["max_abs_diff"] == 0.0
    assert m["files"]["body"]["sha256"] == hashlib.sha256((pkg / "body.pt").read_bytes()).hexdigest()


def test_baselines_train_and_exchange_their_parts(frames):
    m = SFPromptModel(vit(7), 1, 4, prompts=2, reset_classifier=False).unfreeze("head")
    keys = set(m.client_state())
    assert "prompts" in keys and any(k.startswith("head.blocks.0.") for k in keys)
    assert not any(k.startswith("body.") or k.endswith("num_batches_tracked") for k in keys)
    state = {k: v.clone() + 1 for k, v in m.client_state().items()}
    m.load_client_state(state)
    assert all(torch.equal(v, state[k]) for k, v in m.client_state().items())
    full = SFPromptModel(vit(7), 1, 4, prompts=0).unfreeze("head", "body")
    n_all = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in full.client_parameters()) == n_all
    # SplitFed's head trains through the split: the body output's gradient goes back
    x, y = normalised(frames[0][:4]), torch.from_numpy(frames[1][:4])
    before = m.head.blocks[0].mlp.fc1.weight.clone()
    split_step(m, torch.optim.SGD(m.client_parameters(), lr=0.1), x, y, LocalBody(m.body), 1)
    assert not torch.equal(before, m.head.blocks[0].mlp.fc1.weight)


def test_bench_sfprompt_json(tmp_path):
    import json
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    torch.save(create_model("vit_tiny_cifar", 10).state_dict(), tmp_path / "vit.pt")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit",
            "bench",
            "sfprompt",
            "--json",
            "--teacher",
            str(tmp_path / "vit.pt"),
            "--recipe",
            "tests/recipes/tiny-sfprompt-imagenette.yaml",
            "--limit-per-shard",
            "3",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    m = res["methods"]
    assert set(m) == {"sfprompt", "splitfed", "prompt_fl", "fedft", "local"}
    for name, r in m.items():
        assert len(r["accuracy"]) == 2 and all(0 <= a <= 1 for a in r["accuracy"]), name
    assert m["local"]["bytes_up"] == [0, 0] and m["prompt_fl"]["server_macs"] == [0, 0]
    assert m["fedft"]["exchanged_params"] > m["splitfed"]["exchanged_params"] > m["sfprompt"]["exchanged_params"]
    assert m["sfprompt"]["bytes_up"][0] > 4 * m["sfprompt"]["exchanged_params"]  # plus the split traffic
    assert m["sfprompt"]["server_macs"][0] > 0 and m["fedft"]["client_macs"][0] > m["sfprompt"]["client_macs"][0] / 10
