"""EL2N data pruning (Paul et al. 2021, "Deep learning on a data diet"), as SFPrompt uses it.

The EL2N score of a sample is the L2 norm of the error vector ``softmax(f(x)) - onehot(y)``: large
for samples the model gets wrong or is unsure about, small for ones it already fits. SFPrompt
scores each client's data with the client's own parts alone, before any split training of the
round, so that pruning costs no communication: ``f = tail(head(x))``, the head (with the current
prompts) feeding its tokens straight into the tail, the server's body skipped
(:meth:`~edgesplit.families.sfprompt.model.SFPromptModel.local_logits`), in inference mode. The
fraction ``gamma`` with the **highest** scores is kept for the round's split training: the easy
samples are the ones dropped.

**Per class** (recipe key ``split.prune_per_class``, off by default as in the paper): each class
keeps its own fraction ``gamma``, highest scores first, ties broken by a seeded draw per round.
When the client's parts carry no per-image signal, the scores do not rank images at all: with no
block on the client (head = patch embedding, tail = norm + classifier on the class token) the
local path sees the same class token for every image, so the score depends on the label only and
plain pruning drops whole classes. Per-class quotas then amount to a fresh stratified sample each
round, and every class keeps its share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def el2n_scores(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """One score per sample of the normalised images ``x`` with labels ``y``, through head -> tail."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        logits = model.local_logits(x[i : i + batch])
        p = F.softmax(logits.float(), dim=-1)
        p = p - F.one_hot(y[i : i + batch], p.shape[-1]).to(p.dtype)
        out.append(p.norm(dim=-1))
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def keep_count(n: int, gamma: float) -> int:
    """How many of ``n`` samples pruning to ``gamma`` keeps: at least one while there is data."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return 0 if n == 0 else max(1, math.ceil(gamma * n))


def prune(scores: torch.Tensor, gamma: float, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Indices of the ``keep_count`` highest scores (ties broken by index, so it is deterministic),
    in increasing index order. With ``labels``: ``keep_count`` per class, ties broken by a draw
    seeded with ``seed``."""
    if labels is not None:
        return _prune_per_class(scores, gamma, labels, seed)
    k = keep_count(len(scores), gamma)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _prune_per_class(scores: torch.Tensor, gamma: float, labels: torch.Tensor, seed: int) -> torch.Tensor:
    if len(labels) != len(scores):
        raise ValueError(f"prune: {len(scores)} scores but {len(labels)} labels")
    tiebreak = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed)).tolist()
    kept: list[int] = []
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if int(labels[i]) == c]
        members.sort(key=lambda i: (-float(scores[i]), tiebreak[i]))
        kept += members[: keep_count(len(members), gamma)]
    return torch.tensor(sorted(kept), dtype=torch.long)
