"""Generic split: cut any ``torch.export``-able model at a named graph node into a head and a tail.

    gm = trace(model, example)                 # torch.export, batch axis dynamic
    for cut in candidate_cuts(gm): print(cut)   # where exactly one tensor crosses, and its size
    head, tail = split_at(gm, example, "relu_6")
    verify_split(model, head, tail, images)     # head-then-tail == the original, on real inputs
    export_split(head, tail, example, "out/")   # head.onnx + tail.onnx, checked in ONNX Runtime

A **cut point** is a node of the exported graph after which the only value still needed is that
node's output: everything before it is the head, everything after it the tail, and the tensor it
produces is what goes on the wire. Residual blocks hide most nodes (the skip connection is a second
live value), so the cut points are the block boundaries and the plain layers between them.

The zoo's stage API (``stage_names``) is the hand-made version of this for the trained families;
this module needs nothing from the model but that ``torch.export`` can trace it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

BATCH = torch.export.Dim("batch", min=1, max=4096)


class SplitError(ValueError):
    """The node to cut at does not exist or is not a single-tensor cut (the message lists valid ones)."""


@dataclass(frozen=True)
class Cut:
    name: str  # node name in the traced graph: what --at takes
    op: str  # the aten op producing the crossing tensor, e.g. "aten.relu.default"
    module: str  # the nn.Module path it belongs to ("" for the model's own forward)
    shape: tuple[int, ...]  # per frame, without the batch axis
    dtype: str
    bytes_per_frame: int  # the tensor as it is (float32: 4 bytes an element)
    bytes_per_frame_8bit: int  # quantized to 8 bits, as the wire codec would send it

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        return (
            f"{self.name:<28} {self.op:<34} {self.module or '-':<18} {shape:<12} "
            f"{self.bytes_per_frame:>9} B  {self.bytes_per_frame_8bit:>8} B@8bit"
        )


def trace(model: torch.nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` the model in eval mode with a dynamic batch axis and return its graph module
    (parameters and buffers as attributes). Pass the result to :func:`candidate_cuts` and
    :func:`split_at` to trace once."""
    model = model.eval()
    if example.shape[0] == 1:
        # torch.export specialises a size-1 axis to a constant, which would pin the batch to 1.
        example = torch.cat([example, example])
    with torch.no_grad():
        prog = torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},))
    return prog.module()


def _graph_of(model: torch.nn.Module, example: torch.Tensor | None) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if example is None:
        raise ValueError("an example input is needed to trace a model")
    return trace(model, example)


def _is_guard(node: fx.Node) -> bool:
    # torch.export adds a call that checks the input's shape; nothing uses its result, and each half
    # gets its own checks when it is exported again, so neither half keeps it.
    return node.op == "call_module" and not node.users


def _schedule(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's values in execution order: inputs and computations, not weights or guards."""
    return [
        n
        for n in gm.graph.nodes
        if n.op in ("placeholder", "call_function", "call_method", "call_module") and not _is_guard(n)
    ]


def _live_after(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """For every scheduled node, the values still needed by a later node once it has run."""
    order = _schedule(gm)
    position = {n: i for i, n in enumerate(order)}
    end = len(order)
    # Guards read the input but are dropped, so only scheduled nodes and the output keep a value live.
    last_use = {
        n: max(
            (end if u.op == "output" else position[u] for u in n.users if u.op == "output" or u in position), default=-1
        )
        for n in order
    }
    live: list[fx.Node] = []
    result = {}
    for i, n in enumerate(order):
        live = [v for v in live if last_use[v] > i]
        if last_use[n] > i:
            live.append(n)
        result[n] = list(live)
    return result


def _feeds_output_only(node: fx.Node) -> bool:
    return all(u.op == "output" for u in node.users)


def _cut_nodes(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, list[fx.Node]]]:
    live = _live_after(gm)
    cuts = [
        n
        for n, vals in live.items()
        if n.op != "placeholder"
        and vals == [n]
        and isinstance(n.meta.get("val"), torch.Tensor)
        and not _feeds_output_only(n)
    ]  # a cut at the model's output would leave an empty tail
    return cuts, live


def _describe(node: fx.Node) -> Cut:
    val: torch.Tensor = node.meta["val"]
    shape = tuple(int(s) for s in val.shape[1:])
    numel = int(np.prod(shape)) if shape else 1
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    return Cut(
        name=node.name,
        op=str(node.target),
        module=module,
        shape=shape,
        dtype=str(val.dtype).replace("torch.", ""),
        bytes_per_frame=numel * val.element_size(),
        bytes_per_frame_8bit=numel,
    )


def candidate_cuts(model: torch.nn.Module, example: torch.Tensor | None = None) -> list[Cut]:
    """Every single-tensor cut point of the model, in execution order, with the crossing tensor's size."""
    cuts, _ = _cut_nodes(_graph_of(model, example))
    return [_describe(n) for n in cuts]


def _outputs(node: fx.Node) -> list[Any]:
    """The values an output node returns (torch.export flattens them into a tuple)."""
    res = node.args[0]
    return list(res) if isinstance(res, (tuple, list)) else [res]


def _copy_nodes(graph: fx.Graph, nodes: list[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
    """Copy ``nodes`` into ``graph``; weights they read are copied on first use, so each half holds
    only its own parameters and buffers."""

    def lookup(arg: fx.Node) -> fx.Node:
        if arg not in env:
            if arg.op != "get_attr":
                raise SplitError(f"node {arg.name} crosses the cut")  # excluded by the cut check
            env[arg] = graph.node_copy(arg)
        return env[arg]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def split_at(
    model: torch.nn.Module, example: torch.Tensor | None, node_name: str
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut the model after node ``node_name``: ``head(x)`` returns that node's output and
    ``tail(z)`` the model's output from it. Raises :class:`SplitError` naming the valid cut points
    when the node does not exist or more than one value crosses there."""
    gm = _graph_of(model, example)
    cuts, live = _cut_nodes(gm)
    valid = ", ".join(n.name for n in cuts)
    by_name = {n.name: n for n in live}
    if node_name not in by_name:
        raise SplitError(f"no node '{node_name}' in the graph; valid cut points: {valid}")
    cut = by_name[node_name]
    if cut not in cuts:
        crossing = ", ".join(v.name for v in live[cut])
        raise SplitError(
            f"'{node_name}' is not a single-tensor cut (crossing there: {crossing}); valid cut points: {valid}"
        )

    order = _schedule(gm)
    at = order.index(cut)
    inputs = [n for n in order if n.op == "placeholder"]
    if len(inputs) != 1:
        raise SplitError(f"split needs a model with one input, this one has {len(inputs)}")

    head_graph, head_env = fx.Graph(), {}
    _copy_nodes(head_graph, order[: at + 1], head_env)
    head_graph.output(head_env[cut])

    tail_graph = fx.Graph()
    z = tail_graph.placeholder("z")
    z.meta = dict(cut.meta)
    tail_env = {cut: z}
    if any(_mutates(u) for u in cut.users):
        # The model may modify this tensor in place (e.g. ReLU6(inplace=True)); in the whole model it
        # is an intermediate, but in the tail it is the caller's input, so work on a copy.
        tail_env[cut] = tail_graph.call_function(torch.ops.aten.clone.default, (z,))
        tail_env[cut].meta = dict(cut.meta)
    _copy_nodes(tail_graph, order[at + 1 :], tail_env)
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    results = [tail_env[r] if isinstance(r, fx.Node) else r for r in _outputs(output)]
    tail_graph.output(results[0] if len(results) == 1 else tuple(results))

    head, tail = fx.GraphModule(gm, head_graph), fx.GraphModule(gm, tail_graph)
    head.graph.lint()
    tail.graph.lint()
    return head.eval(), tail.eval()


def verify_split(model: torch.nn.Module, head: torch.nn.Module, tail: torch.nn.Module, inputs: torch.Tensor) -> dict:
    """Run the original and head-then-tail on ``inputs``: max abs diff and, for logits, top-1 agreement."""
    with torch.no_grad():
        ref = model.eval()(inputs)
        out = tail(head(inputs))
    rec = {"frames": int(inputs.shape[0]), "max_abs_diff": float((out - ref).abs().max())}
    if ref.dim() == 2:
        rec["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
    return rec


def export_split(
    head: torch.nn.Module, tail: torch.nn.Module, example: torch.Tensor, out_dir: str | Path, weights: str = "fp16"
) -> dict:
    """Write head.onnx (``image`` -> ``z``) and tail.onnx (``z`` -> ``logits``) with the bundle
    exporter's conventions (dynamo, opset 18, dynamic batch, float16-stored weights), run both in
    ONNX Runtime on ``example`` and return their max abs diff against torch."""
    from ..engine import create_engine
    from .export_common import export_onnx, store_weights_fp16

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        z = head(example)
        logits = tail(z)
    export_onnx(head, example, out / "head.onnx", "image", "z")
    export_onnx(tail, z, out / "tail.onnx", "z", "logits")
    report = {}
    for name, inp, ref in (("head", example, z), ("tail", z, logits)):
        path = out / f"{name}.onnx"
        if weights == "fp16":
            store_weights_fp16(path)
        got = create_engine(path, "ort").run1(inp.numpy())
        report[name] = {"path": str(path), "max_abs_diff_vs_torch": float(np.max(np.abs(got - ref.numpy())))}
    return report


def _real_images(source: str, side: int, n: int) -> torch.Tensor:
    from ..data.sources import open_source, take
    from ..data.transforms import preprocess
    from .data import MEAN, STD

    spec = {"shape": [3, side, side], "resize": side, "mean": list(MEAN), "std": list(STD)}
    return torch.from_numpy(np.stack([preprocess(s.data, spec) for s in take(open_source(source), n)]))


def split_main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-") and (argv[0].endswith(".onnx") or Path(argv[0]).is_file()):
        from .split_onnx_bundle import onnx_split_main  # bring your own model: any ONNX graph

        return onnx_split_main(argv)
    from .zoo import INPUT_SIZE, create_model, load_pretrained

    p = argparse.ArgumentParser(
        prog="edgesplit split", description="cut a zoo model at a graph node into head.onnx + tail.onnx"
    )
    p.add_argument("model", help="zoo model name (edgesplit zoo), or an .onnx file (edgesplit split FILE.onnx --help)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--list", action="store_true", help="list the single-tensor cut points with the size crossing each"
    )
    what.add_argument("--at", metavar="NODE", help="node to cut after (a name from --list)")
    p.add_argument("--out", help="directory for head.onnx, tail.onnx and split.json (with --at)")
    p.add_argument("--checkpoint", help="state dict to load (weights_only); default: random init")
    p.add_argument("--num-classes", type=int, default=None, help="default: 10 for *_cifar models, else 1000")
    p.add_argument(
        "--data", default=None, help="real frames for the check (default cifar10:test or imagenette:val by input size)"
    )
    p.add_argument("--frames", type=int, default=64, help="how many real frames the head-then-tail check uses")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.at and not a.out:
        p.error("--at needs --out DIR")
    side = INPUT_SIZE.get(a.model, 224)
    classes = a.num_classes or (10 if a.model.endswith("_cifar") else 1000)
    try:
        model = load_pretrained(a.model, a.checkpoint, classes) if a.checkpoint else create_model(a.model, classes)
    except (KeyError, ValueError) as e:
        print(f"edgesplit split: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    model.eval()
    gm = trace(model, torch.zeros(2, 3, side, side))
    if a.list:
        cuts = candidate_cuts(gm)
        if a.json:
            print(json.dumps([asdict(c) for c in cuts], indent=2))
        else:
            print(f"{'node':<28} {'op':<34} {'module':<18} {'shape':<12} {'fp32/frame':>11}  {'8-bit':>11}")
            for c in cuts:
                print(c.describe())
        return 0
    try:
        head, tail = split_at(gm, None, a.at)
    except SplitError as e:
        print(f"edgesplit split: {e}", file=sys.stderr)
        return 2
    x = _real_images(a.data or ("cifar10:test" if side == 32 else "imagenette:val"), side, a.frames)
    cut = next(c for c in candidate_cuts(gm) if c.name == a.at)
    result = {
        "model": a.model,
        "checkpoint": a.checkpoint,
        "cut": asdict(cut),
        "check": verify_split(model, head, tail, x),
        "onnx": export_split(head, tail, x[:8], a.out),
    }
    Path(a.out, "split.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(result, indent=2)
        if a.json
        else f"cut after {a.at}: {cut.bytes_per_frame} B/frame fp32, {cut.bytes_per_frame_8bit} B at 8 bits; "
        f"head-then-tail vs full: max abs diff {result['check']['max_abs_diff']:.2e}, "
        f"top-1 agreement {result['check'].get('top1_agreement', float('nan')):.3f}; wrote {a.out}/head.onnx, tail.onnx, split.json"
    )
    return 0
