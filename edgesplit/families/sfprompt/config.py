"""The SFPrompt recipe's ``split`` section (torch-free: the recipe loader reads it).

The recipe's ``stage1`` is the per-round **local-loss update** (tail and prompts trained on
``tail(head(x))`` with no communication: ``epochs`` per round, its ``lr``, ``batch``, optimizer),
``stage2`` the per-round **split training** through the body (the same keys). The teacher is the
pretrained ViT the model is cut from (``init: run`` or ``pretrained``); the recipe's dataset is the
federated task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import SplitSection

WIRE_BITS = (8, 16, 32)  # activations and gradients: uint8 codes (per-message range), float16, float32
MAX_PROMPTS = 256
MAX_CLIENTS = 4096


@dataclass(kw_only=True)
class SfpromptSplitCfg(SplitSection):
    """``split:`` of an SFPrompt recipe. Blocks ``[0, head_blocks)`` are in the head,
    ``[head_blocks, body_end)`` in the body, ``[body_end, depth)`` in the tail."""

    head_blocks: int  # blocks after the patch embedding that run on the client, before the wire
    body_end: int  # first block of the tail; the body is [head_blocks, body_end)
    prompts: int = 8  # visual prompt tokens inserted after the class token (0: no prompts, the SplitFed baseline)
    prompt_std: float = 0.02  # prompts start as truncated-normal noise of this std (DeiT's token init)
    reset_classifier: bool = True  # a new task: the tail's classifier starts from zero
    gamma: float = 0.5  # EL2N pruning: the fraction of each client's data kept for split training
    prune_per_class: bool = False  # keep gamma of each class (el2n.py says when that matters)
    prompt_lr: float | None = None  # the prompts' own learning rate (None: the stage's, as every other weight)
    rounds: int = 10
    clients: int = 4  # K: the data is partitioned among this many clients
    clients_per_round: int = 4  # sampled each round
    dirichlet_alpha: float = 0.5  # non-IID label skew of the partition
    act_bits: int = 32  # activations and body outputs on the wire
    grad_bits: int = 32  # gradients on the wire
    local_loss: bool = True  # run the local-loss update each round (off: the ablation)

    def check_recipe(self, recipe: Any) -> None:
        from ...builder.zoo.vit import VIT_CONFIGS

        arch = recipe.teacher.arch
        if arch not in VIT_CONFIGS:
            raise ValueError(f"teacher.arch: SFPrompt cuts a zoo ViT ({', '.join(sorted(VIT_CONFIGS))}), got '{arch}'")
        if recipe.teacher.init == "scratch" and recipe.teacher.train is None:
            raise ValueError("teacher.train: SFPrompt tunes a trained ViT; with init 'scratch', say how to train it")
        depth = VIT_CONFIGS[arch].depth
        check_cut(self.head_blocks, self.body_end, depth)
        if not 0 <= self.prompts <= MAX_PROMPTS:
            raise ValueError(f"split.prompts: must be in [0, {MAX_PROMPTS}], got {self.prompts}")
        if not 0.0 < self.prompt_std <= 1.0:
            raise ValueError(f"split.prompt_std: must be in (0, 1], got {self.prompt_std}")
        if self.prompt_lr is not None and not 0.0 < self.prompt_lr <= 10.0:
            raise ValueError(f"split.prompt_lr: must be in (0, 10] or absent, got {self.prompt_lr}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"split.gamma: must be in (0, 1] (the fraction of data kept), got {self.gamma}")
        if self.rounds < 1:
            raise ValueError(f"split.rounds: must be >= 1, got {self.rounds}")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"split.clients: must be in [1, {MAX_CLIENTS}], got {self.clients}")
        if not 1 <= self.clients_per_round <= self.clients:
            raise ValueError(
                f"split.clients_per_round: must be in [1, clients={self.clients}], got {self.clients_per_round}"
            )
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"split.dirichlet_alpha: must be > 0, got {self.dirichlet_alpha}")
        for key in ("act_bits", "grad_bits"):
            if getattr(self, key) not in WIRE_BITS:
                raise ValueError(f"split.{key}: must be one of {WIRE_BITS}, got {getattr(self, key)}")


def check_cut(head_blocks: int, body_end: int, depth: int) -> None:
    """The cut must leave a body of at least one block and a tail with the classifier."""
    if not 0 <= head_blocks < depth:
        raise ValueError(f"split.head_blocks: must be in [0, {depth - 1}] for a {depth}-block ViT, got {head_blocks}")
    if not head_blocks < body_end <= depth:
        raise ValueError(
            f"split.body_end: must be in [{head_blocks + 1}, {depth}] (a body of at least one block), got {body_end}"
        )
