"""Recipes: typed YAML, validated field by field, never executed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgesplit.builder.recipe import Recipe, RecipeError, TrainCfg, load_recipe
from edgesplit.families.registry import get_family

RECIPES = sorted((Path(__file__).resolve().parents[1] / "models" / "recipes").glob("*.yaml"))
BASE = Path(__file__).resolve().parents[1] / "models" / "recipes" / "cifar10-resnet20-bottlefit-cpu.yaml"


def test_recipes_exist():
    assert len(RECIPES) >= 4
    assert BASE in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.name and r.dataset in ("cifar10", "imagenette")
    if r.split is None:  # a teacher-only recipe (the ViTs): trains the full model and stops there
        assert r.teacher.init == "scratch" and r.teacher.train is not None
        return
    assert isinstance(r.stage1, TrainCfg) and isinstance(r.stage2, TrainCfg)
    if get_family(r.split.family).serving == "scatter":  # ED-ViT: sub-models at the budget's size
        assert len(get_family(r.split.family).entry("model")(r).submodels) == r.split.submodels
        return
    if get_family(r.split.family).serving == "u-shaped":  # SFPrompt: the cut builds, head + body + tail = the 6 blocks
        model = get_family(r.split.family).entry("model")(r)
        cuts = [len(part.blocks) for part in (model.head, model.body, model.tail)]
        assert cuts == [r.split.head_blocks, r.split.body_end - r.split.head_blocks, 6 - r.split.body_end]
        assert r.teacher.arch == "vit_tiny_cifar" and r.teacher.init == "run" and r.teacher.weights
        return
    assert r.default_bits in r.mode_bits
    assert r.split.family in ("bottlefit", "slimmable")
    assert all(isinstance(w, int) for w in r.split.encoder_widths)
    assert isinstance(r.stage1.lr, float)  # YAML ints/floats coerced to the declared type
    if r.teacher.init in ("pretrained", "run", "bundle"):
        assert r.teacher.weights
    else:
        assert r.teacher.train is not None
    # the split the recipe describes can be built: shapes line up with the backbone's split point
    if r.split.family == "slimmable":
        model = get_family(r.split.family).entry("model")(r)
        assert model.wire_shape[0] == r.split.widths[-1]
    else:
        model = get_family(r.split.family).entry("model")(r)
        assert model.wire_shape[0] == r.split.bottleneck_channels


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_round_trips_through_yaml(path, tmp_path):
    # The typed recipe is plain data: dumping it and loading it back gives the same recipe.
    r = load_recipe(path)
    out = tmp_path / "again.yaml"
    out.write_text(yaml.safe_dump(r.to_dict()))
    assert load_recipe(out) == r


def base_data() -> dict:
    return yaml.safe_load(BASE.read_text())


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        d = d[k]
    d[last] = value


def _del(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        d = d[k]
    del d[last]


def test_base_recipe_loads_from_a_copy(tmp_path):
    # The mutation tests below start from this copy: it must be valid as it is.
    assert load_recipe(write(tmp_path, base_data())).name == "cifar10-resnet20-bottlefit"


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("colour", "blue", "colour"),  # unknown top-level key
        ("stage1.momentum", 0.9, "momentum"),  # unknown nested key
        ("split.bottleneck", 12, "bottleneck"),  # a near-miss of bottleneck_channels
    ],
)
def test_unknown_key_is_refused_by_name(tmp_path, field, value, expect):
    d = base_data()
    _set(d, field, value)
    with pytest.raises(RecipeError) as ei:
        load_recipe(write(tmp_path, d))
    assert expect in str(ei.value)
    where = field.rsplit(".", 1)[0] if "." in field else "recipe"
    assert where in str(ei.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("stage1.epochs", "three"),
        ("stage1.epochs", 2.5),
        ("stage1.epochs", True),  # a bool is not an int here
        ("stage2.lr", "fast"),
        ("input_size", [32]),
        ("split.encoder_widths", 32),
        ("split.encoder_widths", [32, "64"]),
        ("teacher.train", "yes"),
        ("split.decoder_final_relu", "no"),
        ("name", 5),
        ("mode_bits", "8"),
    ],
)
def test_wrong_type_is_refused_by_field(tmp_path, field, value):
    d = base_data()
    _set(d, field, value)
    with pytest.raises(RecipeError) as ei:
        load_recipe(write(tmp_path, d))
    assert field in str(ei.value)


def test_missing_required_field_is_named(tmp_path):
    d = base_data()
    _del(d, "split.split_at")
    with pytest.raises(RecipeError, match="split_at"):
        load_recipe(write(tmp_path, d))


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode_bits", [8, 3]),
        ("mode_bits", [16]),
        ("split.train_bits", 5),
        ("split.train_bits", 0),
    ],
)
def test_bad_bits_are_refused(tmp_path, field, value):
    d = base_data()
    _set(d, field, value)
    with pytest.raises(RecipeError) as ei:
        load_recipe(write(tmp_path, d))
    msg = str(ei.value)
    assert field in msg and "2, 4, 6, 8" in msg


def test_default_bits_must_be_a_mode(tmp_path):
    d = base_data()
    d["mode_bits"], d["default_bits"] = [8, 2], 4
    with pytest.raises(RecipeError, match="default_bits"):
        load_recipe(write(tmp_path, d))


def test_pretrained_teacher_needs_weights(tmp_path):
    d = base_data()
    d["teacher"]["init"] = "pretrained"
    with pytest.raises(RecipeError, match=r"teacher\.weights"):
        load_recipe(write(tmp_path, d))
    d["teacher"]["weights"] = None
    with pytest.raises(RecipeError, match=r"teacher\.weights"):
        load_recipe(write(tmp_path, d))
    d["teacher"]["weights"] = "teachers/resnet56-4bfd9763.th"
    assert load_recipe(write(tmp_path, d)).teacher.weights == "teachers/resnet56-4bfd9763.th"


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("teacher.init", "imagenet", "teacher.init"),
        ("augment", "mixup", "augment"),
        ("split.family", "unknownfamily", "split.family"),
    ],
)
def test_enumerated_values_are_checked(tmp_path, field, value, expect):
    d = base_data()
    _set(d, field, value)
    with pytest.raises(RecipeError, match=expect.replace(".", r"\.")):
        load_recipe(write(tmp_path, d))


def test_scratch_teacher_needs_a_training_schedule(tmp_path):
    d = base_data()
    del d["teacher"]["train"]
    with pytest.raises(RecipeError, match=r"teacher\.train"):
        load_recipe(write(tmp_path, d))


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, text))


def test_invalid_yaml_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))


def test_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = BASE.read_text().replace(
        "name: cifar10-resnet20-bottlefit",
        f"name: !!python/object/apply:os.system ['touch {marker}']",
    )
    assert "!!python/object" in text
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, text))
    assert not marker.exists()
    # Also a bare object tag anywhere in the tree.
    text2 = BASE.read_text() + "\nextra: !!python/object:edgesplit.builder.recipe.Recipe {}\n"
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, text2))
