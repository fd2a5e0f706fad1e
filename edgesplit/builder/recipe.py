"""Training recipes: YAML data validated against a typed schema. Nothing in a recipe is executed;
unknown keys and wrong types are errors that name the offending field.

The common fields are here; the ``split`` section is the schema of the family it names
(``split.family``), looked up in :mod:`edgesplit.families.registry`, which also checks the rules
that span fields (e.g. the slimmable family's widths)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ..families.registry import SplitSection, UnknownFamilyError, get_family


class RecipeError(ValueError):
    pass


@dataclass
class DistillCfg:
    """Knowledge distillation from a trained bundle's ``full.onnx`` (run with ONNX Runtime on the
    same augmented batch): loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher/T || student/T)."""

    bundle: str  # a bundle directory; relative paths resolve against the current directory, then the repository
    alpha: float = 0.5
    temperature: float = 2.0


@dataclass
class TrainCfg:
    epochs: int
    lr: float
    batch: int = 256
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    eval_every: int = 5
    freeze_encoder: bool = True
    temperature: float = 1.0
    alpha: float = 0.5
    distill: DistillCfg | None = None  # teacher training only: distil from a trained bundle


@dataclass
class TeacherCfg:
    arch: str
    init: str = "scratch"  # one of TEACHER_INITS
    # "pretrained": path, relative paths resolve against the data root; "run": a teacher.pt that
    # another recipe of this project trained, relative to the runs folder; "bundle": a shipped
    # bundle's directory, its full.onnx rebuilt into ``arch`` (builder/teacher_from_bundle.py).
    weights: str | None = None
    train: TrainCfg | None = None  # from scratch: full training; pretrained: adaptation fine-tune


SplitCfg = SplitSection  # the recipe's ``split``: at load time, the schema of the family it names

TEACHER_INITS = ("scratch", "pretrained", "run", "bundle")
WIRE_BITS = (2, 4, 6, 8)
AUGMENTATIONS = ("crop_flip", "crop_flip_erase", "rrc_flip")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_bundle_dir(path: str) -> Path:
    """A bundle directory named in a recipe: absolute, or relative to the current directory, else
    to the repository (where ``models/`` lives)."""
    p = Path(path)
    if p.is_absolute() or p.is_dir():
        return p
    return REPO_ROOT / p


def check_distill(d: DistillCfg, r: Recipe, where: str) -> None:
    """The distillation teacher must exist, classify this dataset's classes in the same order,
    and take this recipe's input (side and normalisation): it sees the student's batch."""
    if not 0.0 <= d.alpha <= 1.0:
        raise RecipeError(f"{where}.alpha: must be within [0, 1] (got {d.alpha})")
    if d.temperature <= 0:
        raise RecipeError(f"{where}.temperature: must be > 0 (got {d.temperature})")
    check_teacher_bundle(d.bundle, r, f"{where}.bundle", same_size=False)


def check_teacher_bundle(bundle: str, r: "Recipe", where: str, same_size: bool) -> None:
    """A bundle a recipe learns from (a distillation teacher, or ``teacher.init: bundle``) must exist,
    classify this dataset's classes in the same order and take this recipe's normalisation; with
    ``same_size`` also its input side (its layers are trained on, not just run)."""
    import json

    from ..data.sources import CLASSES
    from .data import MEAN, STD

    bdir = resolve_bundle_dir(bundle)
    full, manifest = bdir / "full.onnx", bdir / "manifest.json"
    if not full.is_file() or not manifest.is_file():
        raise RecipeError(f"{where}: {bundle!r} is not a bundle with full.onnx and manifest.json (looked in {bdir})")
    m = json.loads(manifest.read_text())
    if list(m.get("classes", [])) != list(CLASSES.get(r.dataset, [])):
        raise RecipeError(f"{where}: {bundle!r} classifies {m.get('classes')}, not the classes of '{r.dataset}'")
    spec = m.get("input", {})
    shape = spec.get("shape")
    want = [3, r.input_size, r.input_size]
    # another square size is fine for a distillation teacher: it sees the batch resized (builder/distill.py)
    square = isinstance(shape, list) and len(shape) == 3 and shape[0] == 3 and shape[1] == shape[2]
    if not square or (same_size and shape != want):
        kind = "an RGB image of the recipe's size" if same_size else "a square RGB image"
        raise RecipeError(f"{where}: {bundle!r} takes input {shape}, not {kind} (the recipe feeds {want})")
    if tuple(spec.get("mean", ())) != MEAN or tuple(spec.get("std", ())) != STD:
        raise RecipeError(f"{where}: {bundle!r} normalises with other mean/std than the recipe's batches")


@dataclass
class Recipe:
    name: str
    dataset: str
    train_split: str
    eval_split: str
    input_size: int
    augment: str
    teacher: TeacherCfg
    # No ``split``: a teacher-only recipe (train the full model, e.g. a ViT, and stop there);
    # ``stage1``/``stage2`` are then unused and may be left out.
    split: SplitCfg | None = None
    stage1: TrainCfg | None = None
    stage2: TrainCfg | None = None
    stage3: TrainCfg | None = None  # optional: stage 2 continued at ``stage3_bits`` (low-bit modes)
    stage3_bits: int = 2
    mode_bits: list[int] = field(default_factory=lambda: [8])
    default_bits: int = 8
    seed: int = 0
    description: str = ""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise RecipeError(f"{where or 'recipe'}: unknown key(s) {sorted(unknown)} (allowed: {sorted(names)})")
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{where or 'recipe'}: {e}") from None


def _build_split(data: Any, where: str) -> SplitSection:
    if not isinstance(data, dict):
        raise RecipeError(f"{where[:-1]}: expected a mapping, got {type(data).__name__}")
    if "family" not in data:
        raise RecipeError(f"{where}family: required (the split family's name)")
    try:
        schema = get_family(data["family"]).entry("split_schema")
    except UnknownFamilyError as e:
        raise RecipeError(f"{where}family: {e}") from None
    try:
        return _build(schema, data, where)
    except RecipeError as e:  # e.g. a key another family has: say which family's schema refused it
        raise RecipeError(f"{e} [split family {data['family']!r}]") from None


def _coerce(tp, value, where: str):
    if tp is SplitSection:
        return _build_split(value, where + ".")
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is None and hasattr(tp, "__dataclass_fields__"):
        return _build(tp, value, where + ".")
    if origin in (list,):
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def load_recipe(path: str | Path) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    r = _build(Recipe, data, "")
    if r.split is not None:
        for key in ("stage1", "stage2"):
            if getattr(r, key) is None:
                raise RecipeError(f"{key}: required when the recipe has a split section")
        try:
            r.split.check_recipe(r)
        except ValueError as e:  # the family's own rules, each message naming its key
            raise RecipeError(str(e)) from None
    if r.teacher.init not in TEACHER_INITS:
        raise RecipeError("teacher.init: must be 'scratch', 'pretrained', 'run' or 'bundle'")
    if r.teacher.init != "scratch" and not r.teacher.weights:
        raise RecipeError(f"teacher.weights: required when teacher.init is '{r.teacher.init}'")
    if r.teacher.init == "bundle":
        check_teacher_bundle(str(r.teacher.weights), r, "teacher.weights", same_size=True)
    if r.teacher.init == "scratch" and r.teacher.train is None:
        raise RecipeError("teacher.train: required when teacher.init is 'scratch'")
    if r.augment not in AUGMENTATIONS:
        raise RecipeError(f"augment: must be one of {', '.join(AUGMENTATIONS)}")
    if r.teacher.train is not None and r.teacher.train.distill is not None:
        check_distill(r.teacher.train.distill, r, "teacher.train.distill")
    for key in ("stage1", "stage2", "stage3"):
        cfg = getattr(r, key)
        if cfg is not None and cfg.distill is not None:
            raise RecipeError(f"{key}.distill: only teacher training distils from a bundle")
    bad = [b for b in r.mode_bits if b not in WIRE_BITS]
    if bad or not r.mode_bits:
        raise RecipeError(f"mode_bits: each must be one of 2, 4, 6, 8 (got {r.mode_bits})")
    if r.stage3_bits not in WIRE_BITS:
        raise RecipeError(f"stage3_bits: must be one of 2, 4, 6, 8 (got {r.stage3_bits})")
    if r.default_bits not in r.mode_bits:
        raise RecipeError("default_bits: must be one of mode_bits")
    return r
