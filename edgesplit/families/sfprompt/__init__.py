"""SFPrompt (Cao, Zhu, Gong 2024, arXiv 2407.17533): split federated prompt tuning of a pretrained
ViT. The model is cut in three at block indices: the head (patch embedding, the first blocks and
the learnable visual prompts) and the tail (the last blocks and the classifier) live on each
client, the frozen body on the server. Served U-shaped: head on the device, body on the server,
tail back on the device. ``edgesplit export`` writes a U-shaped bundle (head, body, tail and the
whole model as ``full``, the local fallback; docs/BUNDLE.md section 7.3) and, beside it, the body
package the body server loads for split training. Registration only: nothing heavy is imported."""

from ..registry import register_family

register_family(
    "sfprompt",
    summary="ViT cut head/body/tail: prompts and tail tuned on clients, frozen body on the server (U-shaped)",
    split_schema="edgesplit.families.sfprompt.config:SfpromptSplitCfg",
    model="edgesplit.families.sfprompt.model:build_model",
    load_student="edgesplit.families.sfprompt.model:load_student",
    steps="edgesplit.families.sfprompt.steps:run",
    exporter="edgesplit.families.sfprompt.bundle_export:export_bundle",
    serving="u-shaped",
    optional_files=("full",),
    module=__name__,
)
