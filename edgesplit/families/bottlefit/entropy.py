"""A learned entropy bottleneck for BottleFit (issue 14): a factorized prior per channel and a rate
term in the loss; its densities become the integer tables of codec ``"ans"``
(:mod:`edgesplit.wire.ans_tables`, docs/PROTOCOL.md §4.4, docs/BUNDLE.md §7.2) in ``entropy_steps.py``.

The density is the non-parametric one of Ballé et al. 2018 ("Variational image compression with a
scale hyperprior", appendix 6.1): per channel, a small monotone function whose sigmoid is a
cumulative distribution, written here from that description.

**Quantization proxy.** The wire carries ``rint(y)`` (the encoder learns its own scale, so the step
is 1). Training uses two proxies at once, one per term:

- the **rate** is measured on ``y + u``, ``u ~ U(-0.5, 0.5)``: the probability the density gives the
  unit interval around ``y + u`` is, in expectation, the probability of the integer ``rint(y)``, so
  this is an unbiased, differentiable stand-in for the bits the coder will spend, and it trains
  the density to be the one the integer tables are cut from;
- the **task path** (decoder and tail) sees ``rint(y)`` with a straight-through gradient: the tail
  trains on exactly the values the server will decode (additive noise there would train it on
  inputs it never gets, which costs accuracy at these few bits per value).

**Coarser steps from the same model.** The density is continuous, so it gives the probability of
any interval: tables for step ``s`` take ``[(k - ½)s, (k + ½)s]`` per integer ``k``, the wire sends
``rint(y / s)`` and the server reconstructs ``k·s`` (the mode's ``scale``, PROTOCOL.md §4.4). A
coarser step spends fewer bits and costs accuracy, without retraining. The tables are cut in
``entropy_steps.py`` (``export_tables``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...wire.ans_tables import TableSet

_LIK_FLOOR = 1e-9  # the smallest likelihood the rate counts (about 30 bits): keeps log finite


class FactorizedPrior(nn.Module):
    """One learned univariate density per channel, evaluated through its cumulative function."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))  # softplus(init) spreads the initial density
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, v: torch.Tensor) -> torch.Tensor:
        """``v``: ``[C, 1, N]`` points per channel -> the logits of the cumulative function there."""
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            v = torch.matmul(F.softplus(m), v) + b
            if i < len(self.factors):
                v = v + torch.tanh(self.factors[i]) * torch.tanh(v)
        return v

    def likelihood(self, y: torch.Tensor, step: float = 1.0) -> torch.Tensor:
        """The probability of the interval of width ``step`` around each value of ``y`` (``[B, C, H, W]``)."""
        b, c, h, w = y.shape
        v = y.transpose(0, 1).reshape(c, 1, -1)
        lower, upper = self.logits_cdf(v - step / 2), self.logits_cdf(v + step / 2)
        # Subtract on the side of the sigmoid where it is far from 1: no cancellation in the tails.
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return lik.reshape(c, b, h, w).transpose(0, 1)

    @torch.no_grad()
    def cdf_at(self, points: np.ndarray) -> np.ndarray:
        """The cumulative function of every channel at ``points`` (float64 ``[C, N]``)."""
        p = next(self.parameters())
        v = torch.as_tensor(np.asarray(points, dtype=np.float32), device=p.device)
        v = v.reshape(1, 1, -1).expand(self.channels, 1, -1).contiguous()
        return torch.sigmoid(self.logits_cdf(v).double()).reshape(self.channels, -1).cpu().numpy()


class EntropyQuant(nn.Module):
    """The wire stage of an entropy-coded BottleFit split: rounds the encoder output (straight-through
    in training) and records the rate of the batch in bits per frame (``last_bits``, ``[B]``).

    In eval it sends what a mode of step ``step`` sends: ``clip(rint(y / step)) · step``. Training
    always uses step 1 (the step the density and the tail learn at); ``step`` is a plain attribute,
    not state, so a saved student is the same whatever step it was last evaluated at."""

    def __init__(self, channels: int):
        super().__init__()
        self.prior = FactorizedPrior(channels)
        self.bits = 0  # the uniform quantizer's knob, unused here: the training stages set it blindly
        self.step = 1.0
        self.last_bits: torch.Tensor | None = None
        # The tables' support once exported (``clip_to``): eval then clips as the wire encoder does.
        self.register_buffer("lo", torch.full((channels,), -math.inf))
        self.register_buffer("hi", torch.full((channels,), math.inf))

    def clip_to(self, tables: TableSet) -> None:
        self.lo.copy_(torch.tensor(tables.offsets, dtype=torch.float32))
        self.hi.copy_(torch.tensor(np.array(tables.offsets) + tables.sizes() - 1, dtype=torch.float32))

    def rate_bits(self, y: torch.Tensor, step: float = 1.0) -> torch.Tensor:
        lik = self.prior.likelihood(y, step).clamp_min(_LIK_FLOOR)
        return -torch.log2(lik).sum(dim=(1, 2, 3))

    def forward(self, z_in: torch.Tensor) -> torch.Tensor:
        z = z_in.float()  # float32 even under bf16 autocast, as the uniform quantizer does
        if self.training:
            zq = torch.round(z)
            self.last_bits = self.rate_bits(z + torch.empty_like(z).uniform_(-0.5, 0.5))
            return z + (zq - z).detach()
        # float32 division and round half to even: the integers the wire codec computes (ans_codec)
        k = torch.round(z / self.step)
        zq = torch.maximum(torch.minimum(k, self.hi[:, None, None]), self.lo[:, None, None]) * self.step
        self.last_bits = self.rate_bits(zq, self.step)
        return zq


def rate_loss(quant: nn.Module, lam: float | None) -> torch.Tensor | float:
    """``λ · mean bits per frame`` of the last forward pass, or 0 for a uniform quantizer."""
    bits = getattr(quant, "last_bits", None)
    return 0.0 if lam is None or bits is None else lam * bits.mean()
