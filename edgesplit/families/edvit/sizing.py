"""How large a sub-model may be: its cost at a keep ratio, and the largest ratio a device's budget allows.

One knob, the keep ratio ``r``: a sub-model keeps ``r`` of the residual channels, of each block's
heads and of each block's MLP neurons (at least 1 head, 8 channels, 8 neurons), so its linear layers
shrink about as ``r**2``. The ratios tried run from 1 down to 1/16; the largest whose memory and
predicted latency fit the budget on the recipe's device is taken. Cost is computed from the
architecture (no model built): parameters, multiply-accumulates per frame, and memory = float32
weights + the peak activations at batch 1. Latency is the planner's roofline on the device profile
(:class:`edgesplit.control.planner.Machine`, ``Work.roofline_s``): 2 FLOPs per MAC against the
compute figure, weights + activations against the memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...builder.zoo.vit import ViTConfig, per_block
from ...control.planner import Machine, Work
from ...profile.devices import load_profile

RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625)


class BudgetError(ValueError):
    """No keep ratio meets the device's budget; the message names the device, the budget and the
    smallest sub-model reachable."""


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    memory_mb: float
    latency_ms: float | None = None  # on the sizing device, when one is given


@dataclass(frozen=True)
class Size:
    ratio: float
    width: dict  # {"dim": int, "heads": [per block], "mlp_hidden": [per block]}
    cost: Cost
    device: str


def widths_at(cfg: ViTConfig, ratio: float, prune_embedding: bool = True) -> dict:
    heads = per_block(cfg.heads, cfg.depth, "heads")
    hidden = per_block(cfg.mlp_hidden, cfg.depth, "mlp_hidden")
    return {
        "dim": max(8, round(cfg.dim * ratio)) if prune_embedding else cfg.dim,
        "heads": [max(1, round(h * ratio)) for h in heads],
        "mlp_hidden": [max(8, round(m * ratio)) for m in hidden],
    }


def vit_cost(cfg: ViTConfig, num_outputs: int) -> Cost:
    """Parameters, MACs per frame and memory (MB) of a ViT of this config (batch 1, float32)."""
    d, depth = cfg.dim, cfg.depth
    heads = per_block(cfg.heads, depth, "heads")
    qk, vd = per_block(cfg.qk_dim, depth, "qk_dim"), per_block(cfg.v_dim, depth, "v_dim")
    hidden = per_block(cfg.mlp_hidden, depth, "mlp_hidden")
    params = macs = 0
    peak = 0  # floats alive at once: a layer's input and output
    if cfg.stem == "linear":
        grid = cfg.img_size // cfg.patch
        params += 3 * cfg.patch**2 * d + d
        macs += grid * grid * 3 * cfg.patch**2 * d
        peak = 3 * cfg.img_size**2 + grid * grid * d
    else:
        c, side = 3, cfg.img_size
        for w in cfg.stem_widths:
            out = side // 2
            params += c * w * 9 + 2 * w
            macs += out * out * w * c * 9
            peak = max(peak, c * side * side + w * out * out)
            c, side = w, out
        grid = side
        params += c * d + d
        macs += grid * grid * c * d
    tokens = grid * grid + 1
    params += d + tokens * d  # class token, position embedding
    for b in range(depth):
        h, q, v, m = heads[b], qk[b], vd[b], hidden[b]
        params += 4 * d + 2 * (d * h * q + h * q) + (d * h * v + h * v) + (h * v * d + d) + (d * m + m) + (m * d + d)
        macs += tokens * d * h * (2 * q + v) + h * tokens * tokens * (q + v) + tokens * h * v * d + 2 * tokens * d * m
        attn = tokens * (2 * d + h * (2 * q + v)) + h * tokens * tokens
        peak = max(peak, attn, tokens * (2 * d + m))
    params += 2 * d + d * num_outputs + num_outputs
    macs += d * num_outputs
    return Cost(params, macs, (4 * params + 4 * peak) / 2**20)


def predict_ms(cost: Cost, machine: Machine) -> float:
    """The planner's roofline: 2 FLOPs per MAC, weights and activations read once."""
    work = Work(0.0, flops=2.0 * cost.macs, mem_bytes=cost.memory_mb * 2**20)
    return 1e3 * work.roofline_s(machine.gflops, machine.mem_gbps)


def device_machine(name: str) -> Machine:
    return Machine.from_profile(load_profile(name))


def size_for_budget(cfg: ViTConfig, split, num_classes: int) -> Size:
    """The largest keep ratio whose sub-model fits ``split.budget`` on ``split.device``."""
    machine = device_machine(split.device)
    outputs = -(-num_classes // split.submodels) + 1  # the largest subset's classes + "other"
    mem_cap, ms_cap = split.budget.memory_mb, split.budget.latency_ms
    smallest = None
    for r in RATIOS:
        width = widths_at(cfg, r, split.prune_embedding)
        c = vit_cost(sized_config(cfg, width), outputs)
        cost = Cost(c.params, c.macs, c.memory_mb, predict_ms(c, machine))
        smallest = (r, cost)
        if (mem_cap is None or cost.memory_mb <= mem_cap) and (ms_cap is None or cost.latency_ms <= ms_cap):
            return Size(r, width, cost, split.device)
    assert smallest is not None
    r, cost = smallest
    raise BudgetError(
        f"device '{split.device}': no pruning meets the budget memory_mb={mem_cap}, latency_ms={ms_cap}; "
        f"the smallest sub-model reachable (keep ratio {r}) needs {cost.memory_mb:.2f} MB and "
        f"{cost.latency_ms:.3f} ms there: raise the budget, use a faster device or more sub-models"
    )


def sized_config(cfg: ViTConfig, width: dict) -> ViTConfig:
    from dataclasses import replace

    return replace(cfg, dim=width["dim"], heads=list(width["heads"]), mlp_hidden=list(width["mlp_hidden"]))
