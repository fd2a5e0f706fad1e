"""The registry of split families (the shape of timm's ``register_model``).

Each family subpackage of :mod:`edgesplit.families` calls :func:`register_family` in its
``__init__``; :func:`get_family` finds every subpackage with :mod:`pkgutil` the first time it is
asked, so a new family needs no edit anywhere else. The pipeline, the exporter, the recipe loader
and the bundle contract look families up here and never branch on a family's name: a family's own
manifest section is checked by its ``manifest_check``, which the bundle schema runs through
:meth:`Family.check_manifest` without naming the family.

Torch-free on purpose, and a leaf (the stdlib only): the bundle contract (read on every device)
imports this module, and tests/test_layers.py holds it to that. The torch parts of a family (model,
training steps, exporter) are registered as ``"module:attribute"`` paths and imported only when
:meth:`Family.entry` resolves them; a ``manifest_check`` is torch-free (contract-level, stdlib and
wire only), since every reader of a bundle of that family runs it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
from dataclasses import dataclass, field
from typing import Any

# How a bundle of the family is served: the serving shape -> the file roles its bundle must hold.
# "head-tail": the device runs a head, sends one wire tensor, the server runs the tail.
# "scatter": every device runs a whole sub-model on the same input; a fusion head combines their
# features (ED-ViT, docs/BUNDLE.md section 7.1); one "submodel.<id>" role per sub-model besides.
# "u-shaped": the device runs a head, the server a body, the device the tail again (SFPrompt: labels
# and logits never leave the device; docs/PROTOCOL.md section 15).
SERVING_SHAPES: dict[str, tuple[str, ...]] = {
    "head-tail": ("head", "tail"),
    "scatter": ("fusion",),
    "u-shaped": ("head", "body", "tail"),
}
# File roles numbered per part, by serving shape: (how a message names them, the pattern).
NUMBERED_ROLES: dict[str, tuple[str, re.Pattern[str]]] = {
    "scatter": ("submodel.<id>", re.compile(r"^submodel\.(0|[1-9][0-9]?)$")),
}
# Serving shapes whose modes and parts only the family knows: the bundle schema checks the common
# keys and the files, the family's manifest_check (required for these) everything else.
FAMILY_DEFINED_SHAPES = frozenset({"scatter"})
HEAD_ROLE = re.compile(r"^head\.[a-z0-9_-]{1,32}$")  # a per-mode head ("head.c3"), head_per_mode families
# The lazy entry points every family names, as "package.module:attribute".
ENTRY_POINTS = ("split_schema", "model", "load_student", "steps", "exporter")
OPTIONAL_ENTRY_POINTS = ("manifest_check", "manifest_parse")  # "" when the family has none
_ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class UnknownFamilyError(LookupError):
    """No registered family has this name; the message lists the known ones."""


@dataclass(kw_only=True)
class SplitSection:
    """The recipe's ``split`` section: every family's schema is a dataclass that extends this one.

    The recipe loader builds the family's schema from the section (unknown keys and wrong types are
    errors naming the key), then calls :meth:`check_recipe` for the rules that span fields."""

    family: str

    def check_recipe(self, recipe: Any) -> None:
        """Raise ``ValueError("<key>: <why>")`` for a recipe this family cannot train."""


@dataclass(frozen=True)
class Family:
    """One split family: what the build plane runs and what the bundle contract accepts.

    Entry points (``"module:attribute"``, imported on first use):

    - ``split_schema``: a :class:`SplitSection` dataclass, torch-free (the recipe's ``split``).
    - ``model``: ``(recipe) -> torch module``, the untrained split the recipe describes.
    - ``load_student``: ``(path, device="cpu") -> (model, state)``, a trained ``student.pt``.
    - ``steps``: ``(recipe, run_dir, prepared) -> results``, the training steps after
      :func:`edgesplit.builder.pipeline.prepare`; they leave ``student.pt`` and ``results.json``.
    - ``exporter``: ``(student_path, out_dir, options: ExportOptions) -> Bundle``
      (:class:`edgesplit.builder.export_common.ExportOptions`); its first line reads its own
      options with ``options.family_options(<family>, **defaults)``, which refuses any other.
    - ``manifest_check`` (optional, required for a shape in :data:`FAMILY_DEFINED_SHAPES`):
      ``(manifest, files) -> None``, torch-free; the rules of the family's own manifest section
      (keyed by the family's name, docs/BUNDLE.md section 7), run after the common ones passed.
      Raises ``ValueError`` naming the key; the bundle schema reports it as ``"manifest: <why>"``.
    - ``manifest_parse`` (optional, required with ``manifest_check``'s shapes): ``manifest -> (feature
      modes, sub-models, fusion)``, torch-free, on a manifest the check passed; what
      :class:`edgesplit.bundle.Bundle` holds for a bundle of a family-defined shape.
    """

    name: str
    summary: str
    split_schema: str
    model: str
    load_student: str
    steps: str
    exporter: str
    serving: str = "head-tail"
    # Optional file roles beyond the serving shape's own (e.g. "full", "tail_torch").
    optional_files: tuple[str, ...] = ("full",)
    # Whether modes may run their own head file (role "head.<tag>", e.g. one per slimmable width).
    head_per_mode: bool = False
    manifest_check: str = ""
    manifest_parse: str = ""
    module: str = field(default="", compare=False)  # the subpackage that registered it

    @property
    def required_files(self) -> tuple[str, ...]:
        return SERVING_SHAPES[self.serving]

    def is_head_role(self, role: str) -> bool:
        """``head``, or ``head.<tag>`` for a family whose modes run their own heads."""
        return self.serving == "head-tail" and (
            role == "head" or (self.head_per_mode and HEAD_ROLE.match(role) is not None)
        )

    def allows_role(self, role: str) -> bool:
        """Whether a bundle of this family may hold a file under ``role``."""
        numbered = NUMBERED_ROLES.get(self.serving)
        return (
            role in (*self.required_files, *self.optional_files)
            or self.is_head_role(role)
            or (numbered is not None and numbered[1].match(role) is not None)
        )

    def role_names(self) -> list[str]:
        """The file roles this family allows, as an error message lists them."""
        numbered = NUMBERED_ROLES.get(self.serving)
        return [
            *self.required_files,
            *self.optional_files,
            *(["head.<tag>"] if self.head_per_mode else []),
            *([numbered[0]] if numbered else []),
        ]

    def entry(self, point: str) -> Any:
        """Import and return an entry point (``split_schema``, ``model``, ``steps``...)."""
        points = (*ENTRY_POINTS, *OPTIONAL_ENTRY_POINTS)
        if point not in points:
            raise ValueError(f"family entry point must be one of {', '.join(points)}, got {point!r}")
        if not getattr(self, point):
            raise LookupError(f"family {self.name} has no {point}")
        module, attr = getattr(self, point).split(":")
        return getattr(importlib.import_module(module), attr)

    def check_manifest(self, manifest: dict[str, Any], files: dict[str, Any]) -> None:
        """Run the family's ``manifest_check`` (if it has one) on a manifest whose common keys and
        files the bundle schema has checked; ``ValueError`` naming the key when it is refused."""
        if self.manifest_check:
            self.entry("manifest_check")(manifest, files)


_FAMILIES: dict[str, Family] = {}
_LOCK = threading.RLock()
_discovered = False


def register_family(name: str, **record: Any) -> Family:
    """Register a split family (called from the family subpackage's ``__init__``)."""
    fam = Family(name=name, **record)
    if not _NAME.match(name):
        raise ValueError(f"family name {name!r}: lowercase letters, digits, '-' or '_', at most 32")
    for point in (*ENTRY_POINTS, *(p for p in OPTIONAL_ENTRY_POINTS if getattr(fam, p))):
        if not _ENTRY.match(getattr(fam, point)):
            raise ValueError(f"family {name}: {point} must be 'package.module:attribute', got {getattr(fam, point)!r}")
    if fam.serving not in SERVING_SHAPES:
        raise ValueError(f"family {name}: serving shape {fam.serving!r} is not one of {', '.join(SERVING_SHAPES)}")
    if fam.serving in FAMILY_DEFINED_SHAPES and not (fam.manifest_check and fam.manifest_parse):
        raise ValueError(
            f"family {name}: serving shape {fam.serving!r} leaves the modes to the family, so it must name a "
            "manifest_check and a manifest_parse"
        )
    with _LOCK:
        known = _FAMILIES.get(name)
        if known is not None:  # the same record again (a module imported twice) is harmless
            if known != fam:
                raise ValueError(
                    f"family {name!r} is already registered differently (by {known.module or 'another module'})"
                )
            return known
        _FAMILIES[name] = fam
    return fam


def _discover() -> None:
    """Import every subpackage of :mod:`edgesplit.families` once: each registers itself."""
    global _discovered
    with _LOCK:
        if _discovered:
            return
        import edgesplit.families as pkg

        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            if info.ispkg:
                importlib.import_module(info.name)
        _discovered = True


def family_names() -> list[str]:
    """Every registered family, sorted by name."""
    _discover()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _discover()
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"unknown family {name!r} (known: {', '.join(family_names())})") from None
