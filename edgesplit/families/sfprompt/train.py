"""One SFPrompt client's work in a round, written once for every place the body can be:

1. EL2N scores through head -> tail alone and pruning to ``gamma`` (:mod:`.el2n`);
2. the **local-loss update**: tail and prompts trained on ``tail(head(x))``, no communication;
3. **split training** on the kept samples through a :class:`BodyLink`: the head's tokens go to
   the body, its output comes back, the tail's loss is backpropagated to the body output, that
   gradient goes to the body, the gradient at the body's input comes back and finishes the
   backward pass into the prompts. :class:`LocalBody` runs the body in this process (the
   reference, and the baselines); :class:`edgesplit.families.sfprompt.wire_link.WireBody` runs it
   on the body server over the wire, through the same :func:`split_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ...builder.data import MEAN, STD, DeviceLoader
from ...builder.train import make_optimizer
from ...wire.split_train import roundtrip
from .el2n import el2n_scores, prune
from .model import Body, SFPromptModel

CPU = torch.device("cpu")


class BodyLink(Protocol):
    """The body, wherever it runs. ``forward`` and ``backward`` of one ``step`` id pair up."""

    def forward(self, step: int, tokens: np.ndarray, grad: bool) -> np.ndarray: ...

    def backward(self, step: int, grad_out: np.ndarray) -> np.ndarray: ...


class LocalBody:
    """The frozen body in this process. ``act_bits``/``grad_bits`` < 32 pass the tensors through
    the wire codec's quantization both ways, exactly as :class:`WireBody` sends them."""

    def __init__(self, body: Body, act_bits: int = 32, grad_bits: int = 32):
        self.body, self.act_bits, self.grad_bits = body, act_bits, grad_bits
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, step: int, tokens: np.ndarray, grad: bool) -> np.ndarray:
        t = torch.from_numpy(roundtrip(tokens, self.act_bits)).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = self.body(t)
        if grad:
            self._steps[step] = (t, out)
        return roundtrip(out.detach().numpy(), self.act_bits)

    def backward(self, step: int, grad_out: np.ndarray) -> np.ndarray:
        t, out = self._steps.pop(step)
        out.backward(torch.from_numpy(roundtrip(grad_out, self.grad_bits)))
        assert t.grad is not None
        return roundtrip(t.grad.numpy(), self.grad_bits)


@dataclass
class StepFigures:
    """What split training moved and computed (per client, per round)."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    losses: list[float] = field(default_factory=list)


def split_step(
    model: SFPromptModel, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, link: BodyLink, step: int
) -> float:
    """One split-training step through ``link``; returns the loss. The body output's gradient goes
    back only when the head has something to train (prompts; the whole head in SplitFed)."""
    model.train()
    wants_grad = any(p.requires_grad for p in model.head.parameters())
    h = model.head(x)
    b = link.forward(step, np.ascontiguousarray(h.detach().cpu().numpy(), np.float32), wants_grad)
    bt = torch.from_numpy(b).to(x.device).requires_grad_(True)
    loss = F.cross_entropy(model.tail(bt), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if wants_grad:
        assert bt.grad is not None
        gh = link.backward(step, np.ascontiguousarray(bt.grad.cpu().numpy(), np.float32))
        h.backward(torch.from_numpy(gh).to(x.device))
    opt.step()
    return float(loss.detach())


def client_optimizer(model: SFPromptModel, stage: dict, prompt_lr: float | None = None) -> torch.optim.Optimizer:
    """The stage's optimizer over what a client trains, the prompts at ``prompt_lr`` if given:
    a few prompt tokens steer a frozen body only through attention, and prompt tuning is known to
    want a larger step than the weights around it (VPT, Jia et al. 2022, tunes it per task)."""
    params = model.client_parameters()
    if prompt_lr is None or not model.head.n_prompts:
        return make_optimizer(params, stage)
    prompts = model.head.prompts
    rest = [p for p in params if p is not prompts]
    return make_optimizer([{"params": rest}, {"params": [prompts], "lr": prompt_lr, "weight_decay": 0.0}], stage)


def local_loss_update(
    model: SFPromptModel, opt: torch.optim.Optimizer, loader: DeviceLoader, epochs: int
) -> list[float]:
    """Tail and prompts trained on head -> tail, the body skipped; returns the mean loss per epoch."""
    model.train()
    means = []
    for _ in range(epochs):
        tot, n = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(model.local_logits(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + float(loss.detach()) * len(y), n + len(y)
        means.append(tot / max(1, n))
    return means


@dataclass
class RoundReport:
    samples: int  # the client's data
    kept: int  # after EL2N pruning
    local_losses: list[float]
    split_losses: list[float]
    split_steps: int


def client_round(
    model: SFPromptModel,
    x: np.ndarray,
    y: np.ndarray,
    link: BodyLink,
    stage1: dict,
    stage2: dict,
    *,
    gamma: float,
    local_loss: bool,
    augment: str | None,
    seed: int,
    prune_per_class: bool = False,
    prompt_lr: float | None = None,
    step_base: int = 0,
    device: torch.device = CPU,
) -> RoundReport:
    """One client's round on its data ``x`` (uint8 NHWC) and ``y``, starting from the global state
    already loaded into ``model``: EL2N scores and pruning, the local-loss update, split training.
    Step ids are ``step_base + 1, 2, ...``. Deterministic in ``seed``."""
    torch.manual_seed(seed)
    ev = DeviceLoader(x, y, 256, device, MEAN, STD, None)
    xs = torch.cat([b for b, _ in ev]) if len(x) else torch.empty(0)
    labels = torch.from_numpy(y).to(device)
    scores = el2n_scores(model, xs, labels)
    keep = prune(scores, gamma, labels.cpu() if prune_per_class else None, seed).numpy()
    local = []
    if local_loss and stage1["epochs"] > 0:
        loader = DeviceLoader(x, y, stage1["batch"], device, MEAN, STD, augment, shuffle=True, seed=seed)
        local = local_loss_update(model, client_optimizer(model, stage1, prompt_lr), loader, stage1["epochs"])
    opt = client_optimizer(model, stage2, prompt_lr)
    loader = DeviceLoader(x[keep], y[keep], stage2["batch"], device, MEAN, STD, augment, shuffle=True, seed=seed + 1)
    step, split = step_base, []
    for _ in range(stage2["epochs"]):
        tot, n = 0.0, 0
        for xb, yb in loader:
            step += 1
            tot += split_step(model, opt, xb, yb, link, step) * len(yb)
            n += len(yb)
        split.append(tot / max(1, n))
    return RoundReport(len(x), len(keep), local, split, step - step_base)


@torch.no_grad()
def accuracy(model: SFPromptModel, x: np.ndarray, y: np.ndarray, device: torch.device = CPU) -> float:
    """Top-1 accuracy of head -> body -> tail on uint8 NHWC images."""
    model.eval()
    correct = 0
    for xb, yb in DeviceLoader(x, y, 256, device, MEAN, STD, None):
        correct += int((model(xb).argmax(-1) == yb).sum())
    return correct / max(1, len(x))
