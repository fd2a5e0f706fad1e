"""Put the compute precision into an ONNX graph: fp32 in and out, fp16 inside.

TensorRT 10 with a strongly typed network (and TensorRT 11 always) runs every tensor in the type
the graph gives it; builder precision flags no longer choose. A bundle's ``tail.onnx`` stores its
weights as fp16 with a ``Cast`` to fp32 in front, so its compute is fp32. :func:`lower_precision`
rewrites such a graph so that compute is fp16 while the graph's inputs and outputs stay
fp32, which keeps the engine's numpy interface and the wire format unchanged:

- every float initializer becomes fp16, and the exporter's ``weight__fp16 -> Cast(fp32)``
  pairs collapse into the fp16 weight itself (no cast left at run time);
- each fp32 graph input gets a ``Cast`` to fp16, each fp32 output a ``Cast`` back;
- ``Cast(to=float)``, ``Constant`` and ``ConstantOfShape`` nodes that make fp32 tensors make fp16
  instead;
- integer tensors (shapes, slice bounds, pads) are left alone.

The result is checked with ONNX's full type and shape inference, so a graph this cannot rewrite
fails here, with the op named, and not inside TensorRT's builder.

bf16 is not offered: ONNX admits bfloat16 for Conv and ConvTranspose only from opset 22, and the
bundles are opset 18 (the ONNX checker refuses such a graph). The torch backend runs bf16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PRECISIONS = ("fp16",)

# Ops that carry an element type in an attribute this module does not rewrite: converting a graph
# holding one would leave fp32 tensors inside, so they are refused by name.
_TYPED_ATTRIBUTE_OPS = {
    "EyeLike",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def _to_fp16(t):
    """A float32/float64 initializer or constant tensor as float16, same name; others unchanged."""
    from onnx import TensorProto, numpy_helper

    if t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)


def lower_precision(model, precision: str = "fp16"):
    """Return a copy of ``model`` (an ``onnx.ModelProto``) computing in ``precision`` with fp32 I/O."""
    import onnx
    from onnx import TensorProto, helper

    if precision not in PRECISIONS:
        raise ValueError(f"cannot lower an ONNX graph to '{precision}' (offered: {', '.join(PRECISIONS)})")
    target = TensorProto.FLOAT16
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    refused = sorted({n.op_type for n in g.node if n.op_type in _TYPED_ATTRIBUTE_OPS})
    if refused:
        raise ValueError(f"cannot lower the graph's precision: ops with a typed attribute ({', '.join(refused)})")
    if any(n.op_type in ("If", "Loop", "Scan") for n in g.node):
        raise ValueError("cannot lower the graph's precision: subgraphs (If/Loop/Scan) are not handled")

    # 1. Initializers: the exporter's fp16-stored weight + Cast(fp32) pair becomes one fp16 weight.
    inits = {t.name: t for t in g.initializer}
    renamed: dict[str, str] = {}  # Cast output -> the (now fp16) initializer it came from
    keep_nodes = []
    for n in g.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and to == TensorProto.FLOAT and n.input[0] in inits:
            renamed[n.output[0]] = n.input[0]
            continue
        keep_nodes.append(n)
    new_inits = [_to_fp16(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(new_inits)

    # 2. Nodes that make fp32 tensors make fp16 instead.
    for n in keep_nodes:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = target
            elif n.op_type in ("Constant", "ConstantOfShape") and a.name == "value":
                a.t.CopyFrom(_to_fp16(a.t))
            elif n.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                vals = [a.f] if a.name == "value_float" else list(a.floats)
                shape = [] if a.name == "value_float" else [len(vals)]
                arr = np.asarray(vals, np.float32).reshape(shape)
                n.ClearField("attribute")
                n.attribute.append(helper.make_attribute("value", onnx.numpy_helper.from_array(arr.astype(np.float16))))
                break

    # 3. fp32 boundaries: cast inputs down on entry and outputs up on exit.
    head, tail = [], []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name not in inits:
            inner = f"{inp.name}__{precision}"
            for n in keep_nodes:
                for i, name in enumerate(n.input):
                    if name == inp.name:
                        n.input[i] = inner
            head.append(helper.make_node("Cast", [inp.name], [inner], to=target, name=f"{inp.name}__to_{precision}"))
    for out in g.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{out.name}__{precision}"
            for n in keep_nodes:
                for i, name in enumerate(n.output):
                    if name == out.name:
                        n.output[i] = inner
                for i, name in enumerate(n.input):  # an output also read inside the graph
                    if name == out.name:
                        n.input[i] = inner
            tail.append(
                helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{out.name}__to_fp32")
            )
    del g.node[:]
    g.node.extend(head + keep_nodes + tail)
    # The exporter's recorded intermediate types are fp32 and now wrong; inference rebuilds them.
    del g.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:  # onnx raises several exception types for inference errors
        raise ValueError(f"the {precision} graph does not type-check: {e}") from None
    return m


def lower_precision_file(src: str | Path, dst: str | Path, precision: str = "fp16") -> Path:
    """:func:`lower_precision` from file to file; ``dst`` is written, ``src`` is never touched."""
    import onnx

    model = lower_precision(onnx.load(str(src)), precision)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
