"""SFPrompt's three parts cut from a zoo ViT (:class:`~edgesplit.builder.zoo.vit.VisionTransformer`).

- :class:`Head` (client): the patch embedding (with the class token and position embedding), the
  visual prompts inserted right after the class token (VPT-shallow: prompts carry no position
  embedding), then blocks ``[0, head_blocks)``. Only the prompts train; the rest stays frozen
  (and in eval mode: the conv stem's BatchNorm statistics are the pretrained ones).
- :class:`Body` (server): blocks ``[head_blocks, body_end)``, frozen.
- :class:`Tail` (client): blocks ``[body_end, depth)``, the final LayerNorm and the classifier
  (read from the class token), all trained.

Every block maps tokens ``(B, T, D)`` to tokens of the same shape (``T = 1 + prompts + patches``),
so the head's output can enter the tail directly: ``tail(head(x))`` is the model with the body
replaced by the identity, which is what the local-loss update and the EL2N scores run
(:func:`SFPromptModel.local_logits`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...builder.zoo.vit import VisionTransformer, ViTConfig
from .config import check_cut


class Head(nn.Module):
    def __init__(self, vit: VisionTransformer, head_blocks: int, prompts: int, prompt_std: float):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.blocks = nn.ModuleList(vit.blocks[:head_blocks])
        self.n_prompts = prompts
        self.prompts = nn.Parameter(torch.zeros(1, prompts, vit.cfg.dim))
        if prompts:  # seeded: the same cut of the same ViT always starts from the same prompts
            nn.init.trunc_normal_(self.prompts, std=prompt_std, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1) + self.pos_embed
        if self.n_prompts:
            t = torch.cat([t[:, :1], self.prompts.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return t


class Body(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            t = blk(t)
        return t


class Tail(nn.Module):
    def __init__(self, vit: VisionTransformer, body_end: int):
        super().__init__()
        self.blocks = nn.ModuleList(vit.blocks[body_end:])
        self.norm = vit.norm
        self.classifier = vit.head

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            t = blk(t)
        return self.classifier(self.norm(t)[:, 0])


class SFPromptModel(nn.Module):
    """The three parts together; ``forward`` is head -> body -> tail (the served model)."""

    def __init__(
        self,
        vit: VisionTransformer,
        head_blocks: int,
        body_end: int,
        prompts: int = 8,
        prompt_std: float = 0.02,
        reset_classifier: bool = True,
    ):
        super().__init__()
        check_cut(head_blocks, body_end, vit.cfg.depth)
        self.cfg: ViTConfig = vit.cfg
        self.num_classes = vit.head.out_features
        self.cut = {"head_blocks": head_blocks, "body_end": body_end, "prompts": prompts, "prompt_std": prompt_std}
        if reset_classifier:  # a new task: no class of the pretraining task carries over
            nn.init.zeros_(vit.head.weight)
            nn.init.zeros_(vit.head.bias)
        self.head = Head(vit, head_blocks, prompts, prompt_std)
        self.body = Body(list(vit.blocks[head_blocks:body_end]))
        self.tail = Tail(vit, body_end)
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.head.prompts.requires_grad_(prompts > 0)
        for p in self.body.parameters():
            p.requires_grad_(False)
        for p in self.tail.parameters():  # a loaded teacher arrives frozen
            p.requires_grad_(True)
        self.tokens = 1 + prompts + vit.grid**2  # T: tokens between every two blocks
        self.also_trained: tuple[str, ...] = ()  # baselines only: "head" and/or "body" train too

    def unfreeze(self, *parts: str) -> SFPromptModel:
        """Train ``"head"`` and/or ``"body"`` too (the baselines: SplitFed trains the head, federated
        full fine-tuning everything); they then join :meth:`client_state`."""
        for part in parts:
            if part not in ("head", "body"):
                raise ValueError(f"unfreeze: 'head' or 'body', got {part!r}")
            for p in getattr(self, part).parameters():
                p.requires_grad_(True)
        self.also_trained = tuple(sorted(set(self.also_trained) | set(parts)))
        return self

    def train(self, mode: bool = True) -> SFPromptModel:
        # The frozen parts always run as in inference (BatchNorm statistics of the stem stay the
        # pretrained ones); only the tail follows the mode.
        super().train(mode)
        self.head.eval()
        self.body.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """head -> tail with the body skipped (its blocks replaced by the identity)."""
        return self.tail(self.head(x))

    def client_parameters(self) -> list[nn.Parameter]:
        """What a client trains and uploads: the prompts (if any) and the whole tail."""
        extra = [p for part in self.also_trained for n, p in getattr(self, part).named_parameters() if n != "prompts"]
        return ([self.head.prompts] if self.head.n_prompts else []) + list(self.tail.parameters()) + extra

    def client_state(self) -> dict[str, torch.Tensor]:
        """The federated state (FedAvg averages exactly these): ``prompts`` and ``tail.*``."""
        out = {f"tail.{k}": v for k, v in self.tail.state_dict().items()}
        if self.head.n_prompts:
            out["prompts"] = self.head.prompts.detach()
        for part in self.also_trained:
            sd = getattr(self, part).state_dict()  # BatchNorm's counters are bookkeeping, not averaged
            out.update(
                (f"{part}.{k}", v) for k, v in sd.items() if k != "prompts" and not k.endswith("num_batches_tracked")
            )
        return out

    @torch.no_grad()
    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state of :meth:`client_state`'s keys and shapes; anything else is an error."""
        own = self.client_state()
        if set(state) != set(own):
            raise ValueError(
                f"client state keys differ: missing {sorted(set(own) - set(state))}, unknown {sorted(set(state) - set(own))}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"client state '{k}': shape {list(v.shape)}, expected {list(own[k].shape)}")
        self.tail.load_state_dict({k[len("tail.") :]: v for k, v in state.items() if k.startswith("tail.")})
        for part in self.also_trained:
            sub = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
            getattr(self, part).load_state_dict(sub, strict=False)  # the keys were checked above
        if self.head.n_prompts:
            self.head.prompts.copy_(state["prompts"])

    def describe(self) -> dict[str, Any]:
        return {"vit": asdict(self.cfg), "num_classes": self.num_classes, **self.cut}


def from_vit(vit: VisionTransformer, split: Any) -> SFPromptModel:
    return SFPromptModel(
        vit, split.head_blocks, split.body_end, split.prompts, split.prompt_std, split.reset_classifier
    )


def build_model(recipe: Any) -> SFPromptModel:
    """The untrained split of the recipe: a freshly initialised ViT of the teacher's size, cut."""
    from ...builder.zoo import create_model
    from ...data.sources import CLASSES

    vit = create_model(recipe.teacher.arch, len(CLASSES[recipe.dataset]))
    return from_vit(vit, recipe.split)


def vit_config(d: dict[str, Any]) -> ViTConfig:
    """A ViT config from its JSON form (``asdict`` output)."""
    return ViTConfig(**{**d, "stem_widths": tuple(d["stem_widths"])})


def build_body(vit: dict[str, Any], first: int, end: int) -> Body:
    """The body blocks ``[first, end)`` of a ViT of config ``vit`` (JSON form), untrained: the
    body server builds its body this way and loads the package's weights into it (strict)."""
    cfg = vit_config(vit)
    check_cut(first, end, cfg.depth)
    body = Body(list(VisionTransformer(cfg, 1).blocks[first:end])).eval()
    for p in body.parameters():
        p.requires_grad_(False)
    return body


def save_student(model: SFPromptModel, path: Path, extra: dict[str, Any] | None = None) -> None:
    """``student.pt``: the family, the cut and ViT config, every weight (and ``extra``: recipe, results)."""
    torch.save({"family": "sfprompt", **(extra or {}), "describe": model.describe(), "state": model.state_dict()}, path)


def load_student(path: str | Path, device: str = "cpu") -> tuple[SFPromptModel, dict[str, Any]]:
    """A ``student.pt`` written by :func:`save_student` (``weights_only``: tensors and plain data)."""
    obj = torch.load(str(path), map_location=device, weights_only=True)
    d = obj["describe"]
    vit = VisionTransformer(vit_config(d["vit"]), d["num_classes"])
    model = SFPromptModel(vit, d["head_blocks"], d["body_end"], d["prompts"], d["prompt_std"], reset_classifier=False)
    model.load_state_dict(obj["state"], strict=True)
    return model.to(device), d
