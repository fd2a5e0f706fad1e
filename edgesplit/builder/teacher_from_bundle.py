"""A trainable teacher rebuilt from a shipped bundle's ``full.onnx`` (recipe ``teacher.init: bundle``).

A bundle is what the project ships; the checkpoint it was exported from need not be around. Its
``full.onnx`` still holds every weight under the torch module's own name (the exporter keeps
them), so the architecture the recipe names is rebuilt from it by key, as ``load_pretrained`` does
with a state dict. One thing the export changed: each BatchNorm was folded into the convolution
before it (``conv.weight`` scaled, a ``conv.weight_bias`` added). The fold loses BN's four numbers
per channel but not the function, so it is undone like this:

1. conv weights are taken as they are; the BN after each conv is first set to ``x + bias`` (weight
   1, mean 0, variance ``1 - eps``), which makes the torch model compute exactly what the ONNX
   graph does;
2. a calibration pass over training images records, per channel, the mean and variance of each
   conv's output (forward hooks), and the BN is re-parametrised to running mean/var = those
   statistics, weight = ``sqrt(var + eps)``, bias = ``mean + bias``. In eval mode that is still
   ``x + bias`` (the same function, up to float rounding), and in train mode the batch statistics
   now match the running ones, so fine-tuning the layers after a split behaves as it would have on
   the original checkpoint instead of renormalising unscaled activations.

Which BN follows which conv is read from a forward pass (a BN whose input is a conv's output),
not from naming conventions. A conv without a bias in the graph had an all-zero folded bias (the
exporter's optimizer drops those). fp16 weights (``name__fp16``) are widened to float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .zoo import create_model

__all__ = ["BundleTeacherError", "teacher_from_bundle", "onnx_weights", "conv_bn_pairs"]


class BundleTeacherError(ValueError):
    """The bundle's full model does not match the architecture the recipe names."""


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The graph's initializers by name, as float32 where they are floats; ``__fp16`` suffixes dropped."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    out: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        name = init.name.removesuffix("__fp16")
        out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    return out


def conv_bn_pairs(model: nn.Module, input_size: int) -> dict[str, str]:
    """``{conv name: BN name}`` for every BatchNorm2d fed directly by a Conv2d, read from one forward pass."""
    names = {m: n for n, m in model.named_modules()}
    produced_by: dict[int, str] = {}
    pairs: dict[str, str] = {}
    hooks = []

    def on_conv(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        produced_by[id(output)] = names[mod]

    def on_bn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        conv = produced_by.get(id(inputs[0]))
        if conv is not None:
            pairs[conv] = names[mod]

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(on_bn))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _load_folded(model: nn.Module, weights: dict[str, np.ndarray], pairs: dict[str, str], source: str) -> None:
    """Step 1: the ONNX weights into ``model``, every paired BN set to ``x + folded bias``."""
    sd = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    bn_names = set(pairs.values())
    used: set[str] = set()
    modules = dict(model.named_modules())
    for conv, bn in pairs.items():
        bias = weights.get(f"{conv}.weight_bias", weights.get(f"{conv}.bias"))
        if bias is None:  # the exporter's optimizer drops an all-zero bias (an untrained BN's)
            bias = np.zeros(sd[f"{bn}.bias"].shape, np.float32)
        used.update({f"{conv}.weight_bias", f"{conv}.bias"})
        eps = modules[bn].eps  # type: ignore[union-attr]
        new[f"{bn}.weight"] = torch.ones_like(sd[f"{bn}.weight"])
        new[f"{bn}.bias"] = torch.from_numpy(bias.reshape(-1).copy())
        new[f"{bn}.running_mean"] = torch.zeros_like(sd[f"{bn}.running_mean"])
        new[f"{bn}.running_var"] = torch.full_like(sd[f"{bn}.running_var"], 1.0 - float(eps))
        if f"{conv}.bias" in sd:  # a conv with its own bias: the folded bias already includes it
            new[f"{conv}.bias"] = torch.zeros_like(sd[f"{conv}.bias"])
    missing = []
    for key, value in sd.items():
        if key in new or key.endswith("num_batches_tracked"):
            new.setdefault(key, value)
            continue
        if key.rsplit(".", 1)[0] in bn_names:
            continue
        arr = weights.get(key)
        if arr is None or tuple(arr.shape) != tuple(value.shape):
            missing.append(f"{key} {tuple(value.shape)}" + ("" if arr is None else f" (bundle: {tuple(arr.shape)})"))
            continue
        used.add(key)
        new[key] = torch.from_numpy(arr.copy()).to(value.dtype)
    if missing:
        raise BundleTeacherError(f"{source} does not hold these weights of the architecture: {', '.join(missing)}")
    unused = [k for k, a in weights.items() if k not in used and a.ndim >= 1 and a.dtype.kind == "f" and a.size > 2]
    if unused:
        raise BundleTeacherError(f"{source} has weights the architecture does not use: {', '.join(sorted(unused))}")
    model.load_state_dict(new, strict=True)


@torch.no_grad()
def _recalibrate(model: nn.Module, pairs: dict[str, str], images: torch.Tensor, batch: int = 64) -> None:
    """Step 2: per-channel statistics of each conv's output over ``images`` become its BN's."""
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def on_conv(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            o = output.detach().double()
            sums[name] = sums.get(name, 0) + o.sum(dim=(0, 2, 3))
            squares[name] = squares.get(name, 0) + (o * o).sum(dim=(0, 2, 3))
            counts[name] = counts.get(name, 0) + o.numel() // o.shape[1]

        return on_conv

    for conv in pairs:
        hooks.append(mods[conv].register_forward_hook(hook_for(conv)))
    try:
        model.eval()
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    for conv, bn_name in pairs.items():
        bn = mods[bn_name]
        assert isinstance(bn, nn.BatchNorm2d)
        mean = sums[conv] / counts[conv]
        var = (squares[conv] / counts[conv] - mean * mean).clamp_min(0.0)
        folded_bias = bn.bias.detach().double().clone()
        bn.running_mean.copy_(mean.float())  # type: ignore[union-attr]
        bn.running_var.copy_(var.float())  # type: ignore[union-attr]
        bn.weight.copy_(torch.sqrt(var + bn.eps).float())
        bn.bias.copy_((mean + folded_bias).float())


def teacher_from_bundle(arch: str, bundle_dir: Path, num_classes: int, calibration: torch.Tensor) -> nn.Module:
    """``arch`` with the weights of ``bundle_dir/full.onnx``, BatchNorms re-parametrised on
    ``calibration`` (normalised NCHW float images at the recipe's input size)."""
    path = Path(bundle_dir) / "full.onnx"
    if not path.is_file():
        raise BundleTeacherError(f"teacher.weights: no full.onnx in bundle {bundle_dir}")
    model = create_model(arch, num_classes)
    pairs = conv_bn_pairs(model, int(calibration.shape[-1]))
    _load_folded(model, onnx_weights(path), pairs, str(path))
    _recalibrate(model, pairs, calibration)
    return model
