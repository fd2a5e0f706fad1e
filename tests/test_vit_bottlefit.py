"""BottleFit on a ViT teacher: the token bottleneck (edgesplit/families/bottlefit/tokens.py).

Fast checks first: recipe keys refused with their names, the token layout on the wire ([c, N, 1],
class token first), pooling and unpooling in pixel-shuffle order, and a split whose head runs the
teacher's own stages and whose checkpoint holds each weight once. Then the whole chain on real
CIFAR-10 frames through the command line: ``edgesplit train tests/recipes/tiny-vit-bottlefit.yaml``
(a ViT teacher trained for a few steps, stage 1, stage 2, calibration), ``edgesplit export`` and
``edgesplit inspect``; the artefacts show that stage 1 left the tail as the teacher's and stage 2 the
head as stage 1's; the wire size per mode is tokens x channels x bits / 8 as the manifest says; the
bundle is served by the real Server to the real Agent on loopback (logits = head -> codec -> tail
run here) and ``edgesplit eval --json`` reports per-mode accuracy equal to the served one, with the
"send the JPEG" accuracy at each mode's byte count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from build_fixtures import one_torch_thread, require_cifar  # noqa: F401  (autouse: single-threaded torch)
from test_families import edgesplit_cli, local_logits

from edgesplit.builder.bottleneck import pool_tokens, tokens_to_wire, unpool_tokens, wire_to_tokens
from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.zoo import create_model
from edgesplit.bundle import Bundle
from edgesplit.families.bottlefit.model import BottleFitConfig, split_for

RECIPE = Path(__file__).resolve().parent / "recipes" / "tiny-vit-bottlefit.yaml"
CPU_RECIPE = Path(__file__).resolve().parents[1] / "models" / "recipes" / "cifar10-vit-bottlefit-cpu.yaml"
LIMIT_PER_SHARD = 8  # 40 training and 8 test images
FRAMES = 16


def recipe_with(tmp_path: Path, **split) -> Path:
    data = yaml.safe_load(RECIPE.read_text())
    data["split"].update(split)
    for k, v in list(data["split"].items()):
        if v is None:
            del data["split"][k]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# -- recipe keys -----------------------------------------------------------------------------------


def test_shipped_recipes_load():
    for path in (RECIPE, CPU_RECIPE):
        r = load_recipe(path)
        assert r.split.family == "bottlefit" and r.teacher.arch == "vit_tiny_cifar"
    assert load_recipe(CPU_RECIPE).teacher.weights == "cifar10-vit-cpu/teacher.pt"


@pytest.mark.parametrize(
    "split, message",
    [
        ({"encoder_strides": [1, 2]}, "split.encoder_strides: a CNN encoder key"),
        ({"bottleneck_stride": 2}, "split.bottleneck_stride: a CNN encoder key"),
        ({"decoder_final_relu": True}, "split.decoder_final_relu: a CNN encoder key"),
        ({"split_at": "layer1"}, "split.split_at: a ViT splits after 'stem' or 'block<i>'"),
        ({"token_pool": 3}, "split.token_pool: must be one of 1, 2, 4"),
        ({"bottleneck_channels": 0}, "split.bottleneck_channels: must be >= 1"),
        ({"decoder_widths": [0]}, "split.decoder_widths: widths must be >= 1"),
        ({"train_bits": 5}, "split.train_bits"),
    ],
)
def test_vit_recipe_keys_are_checked(tmp_path, split, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(recipe_with(tmp_path, **split))


def test_token_pool_is_refused_on_a_cnn_teacher(tmp_path):
    cnn = yaml.safe_load((RECIPE.parent / "tiny-bottlefit.yaml").read_text())
    cnn["split"]["token_pool"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cnn))
    with pytest.raises(RecipeError, match="split.token_pool: only a ViT teacher's token bottleneck pools tokens"):
        load_recipe(tmp_path / "c.yaml")


def test_split_point_and_pool_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"split point 'block6' is not a stage of vit_tiny_cifar"):
        split_for(vit_cfg(split_at="block6"))  # vit_tiny_cifar has block0..block5
    # DeiT-tiny at 224 px has a 14x14 token grid: 4x4 squares do not tile it
    with pytest.raises(ValueError, match=r"split.token_pool: 4 does not divide the 14x14 token grid"):
        split_for(vit_cfg(arch="deit_tiny_patch16_224", input_size=224, num_classes=1000, token_pool=4))


# -- the token bottleneck ----------------------------------------------------------------------------


def vit_cfg(**kw) -> BottleFitConfig:
    base = dict(
        arch="vit_tiny_cifar",
        num_classes=10,
        input_size=32,
        split_at="block2",
        bottleneck_channels=8,
        encoder_widths=[],
        decoder_widths=[64],
        token_pool=1,
    )
    return BottleFitConfig(**{**base, **kw})


def test_wire_layout_pooling_and_unpooling():
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # class token + a 4x4 grid
    z = tokens_to_wire(t)
    assert z.shape == (2, 3, 17, 1) and torch.equal(z[:, :, 0, 0], t[:, 0]) and torch.equal(wire_to_tokens(z), t)
    pooled = pool_tokens(t, 4, 2)
    grid = t[:, 1:].reshape(2, 4, 4, 3)  # row-major token grid
    assert pooled.shape == (2, 5, 3) and torch.equal(pooled[:, 0], t[:, 0])
    for i in range(2):
        for j in range(2):  # pooled token 1 + 2i + j: the mean of square (i, j)
            torch.testing.assert_close(
                pooled[:, 1 + 2 * i + j], grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2))
            )
    # unpool: channel c*k*k + a*k + b of pooled token (i, j) becomes channel c of token (k*i + a, k*j + b)
    p = torch.randn(2, 4, 3 * 4)
    out = unpool_tokens(p, 2, 2).reshape(2, 4, 4, 3)
    for i, j, a, b, c in [(0, 0, 0, 0, 0), (0, 1, 1, 0, 2), (1, 1, 1, 1, 1), (1, 0, 0, 1, 2)]:
        assert out[1, 2 * i + a, 2 * j + b, c] == p[1, 2 * i + j, c * 4 + a * 2 + b]


@pytest.mark.parametrize("pool", [1, 2])
def test_split_runs_the_teachers_stages_and_holds_each_weight_once(pool):
    torch.manual_seed(0)
    teacher = create_model("vit_tiny_cifar", 10).eval()
    backbone = create_model("vit_tiny_cifar", 10)
    backbone.load_state_dict(teacher.state_dict())
    split = split_for(vit_cfg(token_pool=pool), backbone).eval()
    tokens = 1 + (8 // pool) ** 2
    assert split.wire_shape == (8, tokens, 1) and split.split_shape == (65, 128)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = teacher.run_stage("block2", teacher.run_stage("block1", teacher.run_stage("block0", teacher.embed(x))))
        torch.testing.assert_close(split.encoder.vit(x), ref)  # the head runs the teacher's stem + block0..2
        z = split.encode(x)
        assert z.shape == (3, 8, tokens, 1)
        logits, feats = split(x, return_features=True)
    # decoder output, then the inputs of block4, block5, classifier: as many as the teacher's targets
    assert logits.shape == (3, 10) and [tuple(f.shape) for f in feats] == [(3, 65, 128)] * 4
    keys = split.state_dict().keys()
    assert not any(k.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")) for k in keys)
    assert not any(k.startswith(("backbone.blocks.0.", "backbone.blocks.2.")) for k in keys)
    assert "backbone.blocks.3.attn.q.weight" in keys and "encoder.vit.blocks.2.attn.q.weight" in keys
    assert "encoder.vit.cls_token" in keys and ("decoder.patch_out.weight" in keys) == (pool > 1)


# -- train, export, serve, evaluate on the command line ------------------------------------------------


@dataclass
class Built:
    recipe: object
    run_dir: Path
    bundle: Bundle
    inspect_out: str


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    require_cifar()
    recipe = load_recipe(RECIPE)
    work = tmp_path_factory.mktemp("vit-bottlefit")
    args = ["train", str(RECIPE), "--device", "cpu", "--workers", "1", "--limit-per-shard", str(LIMIT_PER_SHARD)]
    train = edgesplit_cli(args, cwd=work)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = work / "runs" / recipe.name
    out = work / "bundle"
    export = edgesplit_cli(
        ["export", str(run_dir / "student.pt"), "--out", str(out), "--check-frames", str(FRAMES)], work
    )
    assert export.returncode == 0, export.stderr[-3000:]
    inspect = edgesplit_cli(["inspect", str(out)], cwd=work, timeout=120)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    return Built(recipe, run_dir, Bundle.load(out), inspect.stdout)


def test_stages_train_what_they_should(built):
    """Stage 1 trains head and decoder with the tail frozen; stage 2 the decoder and tail with the head frozen."""
    teacher = torch.load(built.run_dir / "teacher.pt", weights_only=True)
    s1 = torch.load(built.run_dir / "stage1.pt", weights_only=True)
    s2 = torch.load(built.run_dir / "stage2.pt", weights_only=True)
    for k in ("blocks.3.attn.q.weight", "blocks.5.mlp.fc2.weight", "head.weight", "norm.weight"):
        assert torch.equal(s1[f"backbone.{k}"], teacher[k]), k  # stage 1: the tail is the teacher's
    assert not torch.equal(s2["backbone.blocks.3.attn.q.weight"], teacher["blocks.3.attn.q.weight"])  # stage 2 tunes it
    for k in ("encoder.vit.blocks.0.attn.q.weight", "encoder.proj.weight", "encoder.vit.pos_embed"):
        assert torch.equal(s2[k], s1[k]), k  # stage 2: the head is stage 1's
    assert not torch.equal(
        s1["encoder.vit.blocks.0.attn.q.weight"], teacher["blocks.0.attn.q.weight"]
    )  # stage 1 tunes it
    assert not torch.equal(s2["decoder.out.weight"], s1["decoder.out.weight"])


def test_wire_is_tokens_by_channels_by_bits(built):
    b, r = built.bundle, built.recipe
    grid, pool, c = 8, r.split.token_pool, r.split.bottleneck_channels
    tokens = 1 + (grid // pool) ** 2  # the class token + the pooled patch tokens
    assert b.wire_spec["shape"] == [c, tokens, 1]
    assert b.manifest["model"]["config"]["token_pool"] == pool
    assert "encoder_strides" not in b.manifest["model"]["config"]
    assert sorted(m.bits for m in b.modes) == sorted(r.mode_bits) and b.default_mode.bits == r.default_bits
    for m in b.modes:
        assert m.channels == c and m.bytes_per_frame == math.ceil(tokens * c * m.bits / 8), m
    assert f"wire     'z' shape [{c}, {tokens}, 1] float32" in built.inspect_out
    for graph, check in b.manifest["export"]["checks"].items():
        assert check["frames"] == FRAMES and check["max_rel_diff"] < 1e-2, (graph, check)


def test_served_streamed_and_evaluated_against_the_jpeg(built, tmp_path):
    from edgesplit.bench.evaluate import best_at_bytes
    from edgesplit.data.sources import open_source, take
    from edgesplit.edge.agent import Agent
    from edgesplit.server.daemon import Server

    b = built.bundle
    samples = list(take(open_source("cifar10:test"), FRAMES))
    labels = np.asarray([s.label for s in samples])
    served = {}
    with Server([b], "tcp://127.0.0.1:0", threads=1, max_batch=8, max_queue_delay_us=500) as srv:
        with Agent(b, srv.endpoint, threads=1) as agent:
            for m in b.modes:
                got = [agent.infer(s, mode=m.id) for s in samples]
                assert all(x.error is None and x.mode == m.id and x.bytes_sent == m.bytes_per_frame for x in got)
                served[m.id] = np.stack([x.logits for x in got])
                np.testing.assert_allclose(served[m.id], local_logits(b, m.id, samples), rtol=1e-4, atol=1e-4)
    ev = edgesplit_cli(
        [
            "eval",
            "--bundle",
            str(b.root),
            "--data",
            "cifar10:test",
            "--frames",
            str(FRAMES),
            "--threads",
            "1",
            "--json",
        ],
        cwd=tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert res["frames"] == FRAMES and res["bundle_hash"] == b.hash
    assert [x["id"] for x in res["modes"]] == [m.id for m in b.modes]
    for x in res["modes"]:
        assert x["accuracy"] == float(np.mean(served[x["id"]].argmax(1) == labels)), x
        assert x["bytes_per_frame"] == b.mode(x["id"]).bytes_per_frame
        # "send the JPEG" at this mode's bytes: the best grid point that fits, or none fits at all
        best = best_at_bytes(res["jpeg_baseline"], x["bytes_per_frame"])
        assert best is None or best["bytes_median"] <= x["bytes_per_frame"]
    assert res["jpeg_accuracy_at_bytes"] == (lambda g: None if g is None else g["accuracy"])(
        best_at_bytes(res["jpeg_baseline"], res["bytes_per_frame"])
    )
    assert res["jpeg_min_bytes"] > max(m.bytes_per_frame for m in b.modes)  # the token wire is below any JPEG here
