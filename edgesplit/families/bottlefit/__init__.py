"""BottleFit (Matsubara et al. 2022): an encoder ending in a narrow bottleneck replaces a CNN's
early stages; one head, one wire tensor, one tail. Registration only: nothing heavy is imported."""

from ..registry import register_family

register_family(
    "bottlefit",
    summary="bottleneck encoder/decoder replacing a CNN's early stages; modes differ in wire bits",
    split_schema="edgesplit.families.bottlefit.config:BottleFitSplitCfg",
    model="edgesplit.families.bottlefit.model:build_model",
    load_student="edgesplit.families.bottlefit.model:load_student",
    steps="edgesplit.families.bottlefit.steps:run",
    exporter="edgesplit.families.bottlefit.export:export_bundle",
    optional_files=("full", "tail_torch", "cdf"),  # cdf: the ans modes' tables (BUNDLE.md 7.2)
    module=__name__,
)
