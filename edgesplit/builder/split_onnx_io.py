"""The bundle's fixed names and shapes around any ONNX graph: an ``[N, 3, S, S]`` float32 input
named ``image``, a wire tensor ``[N, C, h, w]``, a scores output ``[N, K]``.

:func:`input_adapter` says how such an image feeds the graph's own input (nothing, a ``Transpose``
for NHWC, a ``Reshape`` for a flat ``[N, 3*S*S]`` input in C, H, W order); :func:`with_io` renames
a graph's input and output through ``Identity``, ``Reshape`` or ``Transpose`` nodes, so the graph's
own tensors keep their names. Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .split_onnx import OnnxSplitError, dims_of, graph_input

WIRE_NAME, IMAGE_NAME = "z", "image"


def input_adapter(model: onnx.ModelProto, side: int) -> tuple[str, list[int]] | None:
    """How an ``[N, 3, S, S]`` image feeds the graph's input: ``("Transpose", perm)``,
    ``("Reshape", shape)``, or None when it already is one; raises naming the input otherwise."""
    v = graph_input(model)
    dims = dims_of(v) or ()
    frame = list(dims[1:])
    if v.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise OnnxSplitError(f"the graph input '{v.name}' is not float32: edgesplit feeds preprocessed float32 frames")
    if dims and isinstance(dims[0], int):
        raise OnnxSplitError(
            f"the graph input '{v.name}' has a fixed batch of {dims[0]}: export it with a symbolic batch axis "
            "(the server batches frames)"
        )
    fits = lambda want: len(frame) == len(want) and all(d == w or not isinstance(d, int) for d, w in zip(frame, want))  # noqa: E731
    if fits([3, side, side]):
        return None
    if fits([side, side, 3]):
        return ("Transpose", [0, 2, 3, 1])
    if fits([3 * side * side]):
        return ("Reshape", [-1, 3 * side * side])
    shape = "x".join(map(str, dims))
    raise OnnxSplitError(
        f"the graph input '{v.name}' is {shape}: not an image of {side} px ([N,3,{side},{side}], "
        f"[N,{side},{side},3] or [N,{3 * side * side}]); give the size it takes with --input-size"
    )


def image_side(model: onnx.ModelProto) -> int | None:
    """The side S the graph input implies, when it is a static image or flat 3*S*S input."""
    dims = (dims_of(graph_input(model)) or ())[1:]
    if len(dims) == 3 and dims[0] == 3 and isinstance(dims[1], int) and dims[1] == dims[2]:
        return dims[1]
    if len(dims) == 3 and dims[2] == 3 and isinstance(dims[0], int) and dims[0] == dims[1]:
        return dims[0]
    if len(dims) == 1 and isinstance(dims[0], int) and dims[0] % 3 == 0:
        s = int(round((dims[0] // 3) ** 0.5))
        return s if 3 * s * s == dims[0] else None
    return None


def with_io(
    model: onnx.ModelProto,
    *,
    new_input: tuple[str, list[int | str], tuple[str, list[int]] | None] | None = None,
    new_output: tuple[str, list[int | str], list[int] | None] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` whose input and/or output is renamed, through an ``Identity``, a
    ``Reshape`` or a ``Transpose`` node (no data moves for a reshape): ``(name, shape, adapter)``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    front, back, consts = [], [], []
    if new_input is not None:
        name, shape, adapter = new_input
        old = graph_input(m)
        if adapter is None:
            front.append(helper.make_node("Identity", [name], [old.name]))
        elif adapter[0] == "Transpose":
            front.append(helper.make_node("Transpose", [name], [old.name], perm=adapter[1]))
        else:
            consts.append(numpy_helper.from_array(np.asarray(adapter[1], np.int64), f"{name}__shape"))
            front.append(helper.make_node("Reshape", [name, f"{name}__shape"], [old.name]))
        g.input.remove(old)
        g.input.insert(0, helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    if new_output is not None:
        name, shape, reshape = new_output
        old_out = g.output[0]
        if reshape is None:
            back.append(helper.make_node("Identity", [old_out.name], [name]))
        else:
            consts.append(numpy_helper.from_array(np.asarray(reshape, np.int64), f"{name}__shape"))
            back.append(helper.make_node("Reshape", [old_out.name, f"{name}__shape"], [name]))
        g.output.remove(old_out)
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    nodes = [*front, *g.node, *back]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts)
    onnx.checker.check_model(m, full_check=True)
    return m
