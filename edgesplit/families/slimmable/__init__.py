"""Slimmable bottlenecks (Assine et al. 2023): one encoder whose transmitted channel count is chosen
at run time, one head file per width, one shared tail fed the channels zero-filled to full width.
Registration only: nothing heavy is imported."""

from ..registry import register_family

register_family(
    "slimmable",
    summary="one encoder sending a run-time choice of channel widths; one head per width, one shared tail",
    split_schema="edgesplit.families.slimmable.config:SlimmableSplitCfg",
    model="edgesplit.families.slimmable.model:build_model",
    load_student="edgesplit.families.slimmable.model:load_student",
    steps="edgesplit.families.slimmable.steps:run",
    exporter="edgesplit.families.slimmable.export:export_bundle",
    optional_files=("full",),
    head_per_mode=True,
    module=__name__,
)
