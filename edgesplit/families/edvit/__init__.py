"""ED-ViT (Liu et al. 2024, arXiv 2410.11650): a ViT split by classes, not by depth. The classes are
partitioned into N subsets; each subset gets a sub-model pruned from the full ViT (heads, MLP
neurons, embedding channels) for that subset, sized to a device's budget; a fusion MLP maps the
sub-models' features (with a mask of which answered) to every class. Served by scatter: every
device runs its whole sub-model on the frame. Registration only: nothing heavy is imported."""

from ..registry import register_family

register_family(
    "edvit",
    summary="class-partitioned pruned ViT sub-models on several devices, fused by a small MLP that tolerates a missing one",
    split_schema="edgesplit.families.edvit.config:EdvitSplitCfg",
    model="edgesplit.families.edvit.model:build_model",
    load_student="edgesplit.families.edvit.model:load_student",
    steps="edgesplit.families.edvit.steps:run",
    exporter="edgesplit.families.edvit.export:export_bundle",
    serving="scatter",
    optional_files=("full",),
    manifest_check="edgesplit.families.edvit.manifest:validate_scatter",  # BUNDLE.md section 7.1
    manifest_parse="edgesplit.families.edvit.manifest:parse",
    module=__name__,
)
