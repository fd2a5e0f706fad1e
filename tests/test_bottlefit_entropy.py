"""BottleFit with a learned entropy bottleneck (issue 14): the recipe keys, a short real training on
a slice of real CIFAR-10 that lowers the rate, the export of the densities to integer tables, and
real frames coded by codec "ans": exact, and as long as the tables say within a stated margin; a
coarser quantization step from the same density (its own tables, fewer bytes), exact as well."""

from __future__ import annotations

from pathlib import Path

import constriction  # noqa: F401  (codec 'ans' needs the entropy extra, which tools/setup.sh installs)
import numpy as np
import pytest
import torch
import yaml
from build_fixtures import torch_threads

from edgesplit.builder.data import MEAN, STD, DeviceLoader, load_split
from edgesplit.builder.recipe import RecipeError, load_recipe
from edgesplit.builder.zoo import create_model
from edgesplit.families.bottlefit.entropy import EntropyQuant
from edgesplit.families.bottlefit.entropy_steps import at_step, export_tables, measure_rate, tables_name
from edgesplit.families.bottlefit.model import build_model
from edgesplit.families.bottlefit.train import distill_stage1
from edgesplit.wire import ans_codec as A
from edgesplit.wire.ans_tables import TAG_BYTES, parse_tables, tables_document

RECIPES = Path(__file__).resolve().parent / "recipes"


def _recipe(tmp_path: Path, name: str = "tiny-bottlefit.yaml", **split):
    data = yaml.safe_load((RECIPES / name).read_text())
    data["split"].update(split)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def test_recipe_asks_for_the_entropy_bottleneck(tmp_path):
    r = _recipe(tmp_path, entropy_lambda=0.05)
    assert r.split.entropy_lambda == 0.05
    assert isinstance(build_model(r).quant, EntropyQuant)
    assert not isinstance(build_model(_recipe(tmp_path)).quant, EntropyQuant)
    for bad in (0, -1.0, 5000, True, "much"):
        with pytest.raises(RecipeError, match=r"split\.entropy_lambda"):
            _recipe(tmp_path, entropy_lambda=bad)
    with pytest.raises(RecipeError, match=r"entropy"):
        _recipe(tmp_path, entropy={"lambda": 0.05})  # unknown key
    with pytest.raises(RecipeError, match=r"split\.entropy_lambda: .*CNN"):
        _recipe(tmp_path, "tiny-vit-bottlefit.yaml", entropy_lambda=0.05)


def test_recipe_entropy_steps_are_checked():
    from edgesplit.families.bottlefit.config import check_entropy_steps

    assert check_entropy_steps([2, 1.0, 1.5], "s") == [1.0, 1.5, 2.0]  # sorted, finest (most bytes) first
    assert [tables_name(s) for s in (1.0, 1.5, 2.0, 0.75)] == ["main", "s1.5", "s2", "s0.75"]
    for bad in ([], [2.0], [1.0, 1.0], [1.0, 0.1], [1.0, 20], [1.0, 1.0005], [1.0, True], "1,2", None):
        with pytest.raises(ValueError, match="s: "):
            check_entropy_steps(bad, "s")


def test_recipe_asks_for_entropy_steps(tmp_path):
    r = _recipe(tmp_path, entropy_lambda=0.05, entropy_steps=[1, 2.5])
    assert r.split.entropy_steps == [1.0, 2.5]
    with pytest.raises(RecipeError, match=r"split\.entropy_steps: .*1\.0 among them"):
        _recipe(tmp_path, entropy_lambda=0.05, entropy_steps=[2.0, 3.0])
    with pytest.raises(RecipeError, match=r"split\.entropy_steps: only an entropy bottleneck"):
        _recipe(tmp_path, entropy_steps=[1.0, 2.0])


def _mean_bits(student, loader) -> float:
    student.eval()
    bits = []
    with torch.no_grad():
        for x, _ in loader:
            student(x)
            bits.append(student.quant.last_bits)
    return float(torch.cat(bits).mean())


def test_short_training_lowers_the_rate_and_frames_code_as_estimated(tmp_path):
    dev = torch.device("cpu")
    xtr, ytr = load_split("cifar10", "train", 32, limit_per_shard=64)  # 320 real training images
    xte, yte = load_split("cifar10", "test", 32, limit_per_shard=64)
    train = DeviceLoader(xtr, ytr, 32, dev, MEAN, STD, shuffle=True, seed=1)
    test = DeviceLoader(xte, yte, 32, dev, MEAN, STD)
    r = _recipe(tmp_path, entropy_lambda=1e-2)
    with torch_threads(1):
        torch.manual_seed(0)
        teacher = create_model(r.teacher.arch, 10).eval()
        student = build_model(r)
        before = _mean_bits(student, test)
        cfg = {"epochs": 4, "lr": 1e-2, "batch": 32, "optimizer": "adam", "weight_decay": 0.0, "warmup_epochs": 0.1}
        distill_stage1(student, teacher, cfg, train, dev, tmp_path, lambda rec: None)
        after = _mean_bits(student, test)
        assert after < 0.7 * before, (before, after)

        tables = export_tables(student.quant)
        assert parse_tables(tables_document([tables]))["main"].digest == tables.digest
        student.quant.clip_to(tables)
        rate = measure_rate(student, test, tables)
        # Coded bytes = tag + whole 32-bit words: the tables' ideal length plus 2 to 10 bytes.
        assert rate["ideal_bytes_mean"] + TAG_BYTES - 4 <= rate["bytes_mean"] <= rate["ideal_bytes_mean"] + 10
        # The learned density's own estimate and the 16-bit integer tables agree within 3 % + 2 bytes.
        assert abs(rate["model_bytes_mean"] - rate["ideal_bytes_mean"]) <= 0.03 * rate["ideal_bytes_mean"] + 2

        # Exact: what the server decodes is what the tail saw in torch.
        student.eval()
        with torch.no_grad():
            x, _ = next(iter(test))
            y = student.encode(x).float()
            sent = student.quant(y).numpy()
        for frame, want in zip(y.numpy(), sent):
            d, payload = A.encode(frame, tables, name="z")
            assert np.array_equal(A.decode(d, payload, tables), want)

        # A coarser step from the same density: its own tables, fewer bytes, the same agreement
        # with the density's estimate, and exact too (the server reconstructs k x step).
        lo, hi = student.quant.lo.clone(), student.quant.hi.clone()
        for step in (2.0, 1.5):
            coarse = export_tables(student.quant, tables_name(step), step=step)
            assert coarse.name == tables_name(step) and coarse.digest != tables.digest
            assert coarse.sizes().sum() < tables.sizes().sum()  # wider intervals: fewer values per channel
            with at_step(student.quant, coarse, step):
                r2 = measure_rate(student, test, coarse, step=step)
                with torch.no_grad():
                    sent2 = student.quant(y).numpy()
            assert r2["bytes_mean"] < rate["bytes_mean"], (step, r2, rate)
            assert abs(r2["model_bytes_mean"] - r2["ideal_bytes_mean"]) <= 0.03 * r2["ideal_bytes_mean"] + 2
            assert not np.array_equal(sent2, sent) and np.allclose(sent2 / step, np.rint(sent2 / step))
            for frame, want in zip(y.numpy(), sent2):
                d, payload = A.encode(frame, coarse, scale=step, name="z")
                assert d["scale"] == step and np.array_equal(A.decode(d, payload, coarse), want)
        # at_step put back the main tables' clipping and step 1
        assert torch.equal(student.quant.lo, lo) and torch.equal(student.quant.hi, hi) and student.quant.step == 1.0
