"""Training recipes: YAML data validated against a typed schema. Nothing in a recipe is executed;
unknown keys and wrong types are errors that name the offending field."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .families.bottlefit import BottleneckSpec


class RecipeError(ValueError):
    pass


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


@dataclass
class TeacherCfg:
    arch: str
    init: str = "scratch"  # "scratch" | "pretrained" | "run"
    # "pretrained": path, relative paths resolve against the data root; "run": a teacher.pt that
    # another recipe of this project trained, relative to the runs folder.
    weights: str | None = None
    train: TrainCfg | None = None  # from scratch: full training; pretrained: adaptation fine-tune


@dataclass(kw_only=True)
class SplitCfg(BottleneckSpec):
    family: str
    # slimmable only: the channel counts that can be sent, ascending, the last = bottleneck_channels,
    # and how many random middle widths each sandwich-rule step adds to the widest and narrowest.
    widths: list[int] = field(default_factory=list)
    sandwich_random: int = 1


@dataclass
class Recipe:
    name: str
    dataset: str
    train_split: str
    eval_split: str
    input_size: int
    augment: str
    teacher: TeacherCfg
    split: SplitCfg
    stage1: TrainCfg
    stage2: TrainCfg
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


def _coerce(tp, value, where: str):
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
    if r.split.family not in ("bottlefit", "slimmable"):
        raise RecipeError(f"split.family: '{r.split.family}' has no training recipe yet (known: bottlefit, slimmable)")
    if r.split.family == "slimmable":
        w = r.split.widths
        if not w or w != sorted(set(w)) or w[0] < 1 or w[-1] != r.split.bottleneck_channels:
            raise RecipeError(f"split.widths: must be distinct ascending channel counts ending at bottleneck_channels "
                              f"({r.split.bottleneck_channels}), got {w}")
        if r.stage3 is not None:
            raise RecipeError("stage3: not used by the slimmable family (every width trains at split.train_bits)")
    elif r.split.widths:
        raise RecipeError("split.widths: only the slimmable family has widths")
    if r.teacher.init not in ("scratch", "pretrained", "run"):
        raise RecipeError("teacher.init: must be 'scratch', 'pretrained' or 'run'")
    if r.teacher.init in ("pretrained", "run") and not r.teacher.weights:
        raise RecipeError(f"teacher.weights: required when teacher.init is '{r.teacher.init}'")
    if r.teacher.init == "scratch" and r.teacher.train is None:
        raise RecipeError("teacher.train: required when teacher.init is 'scratch'")
    if r.augment not in ("crop_flip", "rrc_flip"):
        raise RecipeError("augment: must be 'crop_flip' or 'rrc_flip'")
    bad = [b for b in r.mode_bits if b not in (2, 4, 6, 8)]
    if bad or not r.mode_bits:
        raise RecipeError(f"mode_bits: each must be one of 2, 4, 6, 8 (got {r.mode_bits})")
    if r.split.train_bits not in (2, 4, 6, 8):
        raise RecipeError(f"split.train_bits: must be one of 2, 4, 6, 8 (got {r.split.train_bits})")
    if r.stage3_bits not in (2, 4, 6, 8):
        raise RecipeError(f"stage3_bits: must be one of 2, 4, 6, 8 (got {r.stage3_bits})")
    if r.default_bits not in r.mode_bits:
        raise RecipeError("default_bits: must be one of mode_bits")
    return r
