"""Class-wise importance of the teacher's heads, MLP neurons and residual channels, and what to keep.

Importance is first-order Taylor (Molchanov et al. 2019): the loss change when a unit's activation
is removed is about ``|sum(a * dL/da)|`` over the unit's elements. It is measured on the subset's
own training images, with the loss the teacher's cross-entropy restricted to the subset's classes
(the logits of the other classes are left out), so a unit scores high when it matters for telling
this subset's classes apart, which is what the sub-model will be asked to do:

- head h of block b: the elements of the attention output that ``proj`` reads from head h;
- neuron j of block b: its GELU output (the input of ``fc2``);
- residual channel c: the token stream after the stem and after every block, summed.

Per sample, the absolute value of the sum over the unit's elements; then the mean over samples.
"""

from __future__ import annotations

import torch

from ...builder.zoo.vit import VisionTransformer, per_block
from .model import Keep


def taylor_importance(
    teacher: VisionTransformer, x: torch.Tensor, y: torch.Tensor, classes: list[int], batch: int = 64
):
    """Scores ``(channels [dim], heads [depth][H], neurons [depth][M])`` on images ``x`` (labels
    ``y``, all in ``classes``)."""
    cfg = teacher.cfg
    depth = cfg.depth
    heads = per_block(cfg.heads, depth, "heads")
    vd = per_block(cfg.v_dim, depth, "v_dim")
    remap = torch.full((int(teacher.head.out_features),), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    ch = torch.zeros(cfg.dim)
    hs = [torch.zeros(h) for h in heads]
    ns = [torch.zeros(blk.mlp.fc1.out_features) for blk in teacher.blocks]
    caught: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(_mod, args):
            args[0].retain_grad()
            caught[name] = args[0]

        return hook

    handles = []
    for b, blk in enumerate(teacher.blocks):
        handles.append(blk.attn.proj.register_forward_pre_hook(keep_input(f"attn{b}")))
        handles.append(blk.mlp.fc2.register_forward_pre_hook(keep_input(f"mlp{b}")))
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.enable_grad():
            for i in range(0, len(x), batch):
                # the teacher's weights are frozen: the graph hangs on the input instead
                xb, yb = x[i : i + batch].clone().requires_grad_(True), y[i : i + batch]
                stream = [teacher.embed(xb)]
                stream[0].retain_grad()
                t = stream[0]
                for blk in teacher.blocks:
                    t = blk(t)
                    t.retain_grad()
                    stream.append(t)
                logits = teacher.head(teacher.norm(t)[:, 0])[:, classes]
                loss = torch.nn.functional.cross_entropy(logits, remap[yb], reduction="sum")
                teacher.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for s in stream:
                        ch += (s * s.grad).sum(1).abs().sum(0)
                    for b in range(depth):
                        a = caught[f"attn{b}"]
                        per_head = (a * a.grad).unflatten(-1, (heads[b], vd[b])).sum((1, 3))
                        hs[b] += per_head.abs().sum(0)
                        m = caught[f"mlp{b}"]
                        ns[b] += (m * m.grad).sum(1).abs().sum(0)
    finally:
        for h in handles:
            h.remove()
        teacher.zero_grad(set_to_none=True)
        teacher.train(was_training)
    n = max(1, len(x))
    return ch / n, [h / n for h in hs], [m / n for m in ns]


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, sorted (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose_keep(scores, width: dict, prune_embedding: bool = True) -> Keep:
    """What a sub-model of ``width`` keeps: the highest-scoring channels, heads and neurons."""
    ch, hs, ns = scores
    channels = top(ch, width["dim"]) if prune_embedding else list(range(len(ch)))
    return Keep(
        channels,
        [top(h, k) for h, k in zip(hs, width["heads"])],
        [top(m, k) for m, k in zip(ns, width["mlp_hidden"])],
    )
